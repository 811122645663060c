"""vatt_fast: a fast, usable PyTorch implementation of VATT.

VATT (Akbari et al., NeurIPS 2021) trains three Transformers on raw video frames,
raw audio waveforms and speech text with contrastive losses. See README.md.
"""

__version__ = "0.1.0"
