"""The penalty plan (a list of terms, one per block kind) and its autograd glue."""
