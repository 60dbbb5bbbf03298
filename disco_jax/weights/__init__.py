"""Weights files: the official state-dict mapping, our msgpack files, VGG19 and InceptionV3 imports."""
