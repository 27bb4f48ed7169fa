"""The data room: MNIST or Fashion-MNIST (``data.dataset``) from the official files to the arrays every
other room reads.

- :mod:`.fetch`: the download stage's work: the mirrors, the checksums of the uncompressed files,
  one ``.npz`` written atomically;
- :mod:`.idx`: the IDX file format of the official files, parsed and checked;
- :mod:`.dataset`: :class:`~.dataset.ImageData` and :func:`~.dataset.load_dataset`, what training,
  evaluation, the search and the benchmarks read, and each dataset's title and label names;
- :mod:`.pictures`: a user's photo or drawing of a digit prepared as an MNIST image (28x28, white
  ink on black, centred by its centre of mass).

May import the top-level modules only (config, errors, atomic, progress).
"""
