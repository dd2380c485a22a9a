"""seqdeploy: novel sequence architectures to fast, verified GPU deployments."""
__version__ = "0.1.0"
