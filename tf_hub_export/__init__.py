"""Export to and import from reusable SavedModels (TF Hub format).

`export.export_saved_model` writes a model; `load.load_model` rebuilds the
Keras model from an export and restores every weight, checked.
"""
