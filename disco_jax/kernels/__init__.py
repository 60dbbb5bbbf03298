"""Hand-tuned custom VJPs for XLA:CPU, apart from the layers that use them."""
