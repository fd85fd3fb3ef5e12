"""imgproxy's built-in plugins, installed as `imgproxy.plugins` and loaded through the
`imgproxy` entry-point group exactly like third-party plugins."""
