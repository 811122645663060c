"""Drop-in VATT layers. Import from the submodules or from here."""
