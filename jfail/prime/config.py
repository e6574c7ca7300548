"""The configuration of a PRIME experiment (seed 004): `jfail.config.PrimeConfig`, beside the
other methods' configs, re-exported here so that `jfail.prime.PrimeConfig` and
`jfail.prime.config.PrimeConfig` keep working."""

from jfail.config import PrimeConfig

__all__ = ["PrimeConfig"]
