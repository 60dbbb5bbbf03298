"""The networks as Linen modules: the layers, the four DISCO networks, DISCO, VGG19, InceptionV3."""
