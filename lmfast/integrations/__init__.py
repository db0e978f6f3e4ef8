"""Model patching (lmfast.patch) lands here: a table from module class / attention interface
to the lmfast replacement."""
