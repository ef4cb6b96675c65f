"""metatta: test-time adaptation of image classifiers, with learned adapters."""
__version__ = "0.1.0"
