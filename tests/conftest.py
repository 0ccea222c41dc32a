"""Suite-wide settings."""

from hypothesis import settings

# Property tests run the same examples on every machine (no flaky CI), and
# leave no example database in the work tree; deadlines are off because a
# loaded 2-core CI machine makes them meaningless.
settings.register_profile("lbserver", derandomize=True, database=None, deadline=None)
settings.load_profile("lbserver")
