"""Re-export of `dultra_jax.interop.torch_reference` (the PyTorch reference model), for the tests."""
from dultra_jax.interop.torch_reference import *  # noqa: F401,F403
from dultra_jax.interop.torch_reference import __all__  # noqa: F401
