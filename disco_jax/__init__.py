"""disco-jax: DISCO (Disentangled Image Colorization via Global Anchors) in JAX/Flax.

`from disco_jax import Colorizer` (see `disco_jax.inference.api`); importing the package itself
loads nothing else, so `import disco_jax` stays light.
"""
__all__ = ['Colorizer']


def __getattr__(name):
  if name == 'Colorizer':
    from disco_jax.inference.api import Colorizer  # pylint: disable=g-import-not-at-top
    return Colorizer
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
