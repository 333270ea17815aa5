"""Sources of the integration bundle's examples (``edgeq.export.bundle``): Python snippets and native text."""
