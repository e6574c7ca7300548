"""Tools for testing jfail and code built on it: fault injection (`faults`)."""
