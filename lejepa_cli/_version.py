"""The package's version, in a module of its own so any module can read it without importing the
package's __init__ (whose lazy public API imports back into the package)."""

__version__ = "0.1.0"
