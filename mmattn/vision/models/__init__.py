"""timm model families (one module per family); importing registers them with timm."""
