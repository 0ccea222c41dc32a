"""Programs that stand in for third-party images in the cluster tests: the
SkyWalking OAP (`oap`), an application with the SkyWalking Python agent
(tests.support.skywalking_agent) and a native grpcio grpclb client
(`grpclb_client`). `registry` pushes them under the names the docs use."""
