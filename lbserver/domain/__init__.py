"""Pure balancing logic: membership, weights, names and server lists.

Nothing here does I/O or reads a clock; callers pass the time in. That keeps
every rule unit-testable and makes replicas fed the same inputs agree.
"""
