"""Tools for testing jfail and code built on it: fault injection (`faults`), HTTP probes of the
annotation server (`http_probe`), random Flax variables without running initializers
(`variables`), and PyTorch twins of jfail's networks with the weight copy between the two
(`torch_reference`, needs torch). Import the submodules; this package imports none of them."""
