"""Readers for evaluation datasets in their distributed file formats (numpy out, no TF)."""

from dff3d.datasets.aflw2000_3d import (
    Aflw2000Listing,
    DatasetFormatError,
    DatasetNotFoundError,
    list_aflw2000_3d,
    load_aflw2000_3d_mat,
)

__all__ = [
    "Aflw2000Listing",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "list_aflw2000_3d",
    "load_aflw2000_3d_mat",
]
