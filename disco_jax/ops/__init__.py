"""Pure jnp maths: colour (Lab, gamut, ab bins), superpixel pooling and diffusion, anchors."""
