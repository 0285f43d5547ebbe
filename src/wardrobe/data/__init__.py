"""Datasets: the IDX and picture-folder readers, picture decoding, the prepared splits."""
