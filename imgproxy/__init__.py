"""imgproxy: an OpenAI Images API gateway in front of image-generation providers."""

__version__ = "0.1.0"
