import sys

from disco_jax import app

sys.exit(app.main())
