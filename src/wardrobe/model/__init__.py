"""The model: its factory, the project's layers, the model file and its classifiers, the exported formats."""
