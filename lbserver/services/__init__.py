"""gRPC servicers. Each is thin: validate the request, call the Balancer, map
errors to status codes."""
