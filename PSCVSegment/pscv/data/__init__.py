"""The data layer: files and plain data (images, geometry, clicks, classes, segmentations); never torch."""
