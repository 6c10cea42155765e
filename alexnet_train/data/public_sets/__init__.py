"""The public datasets ``alexnet-data`` lays out, one module each; ``data.public`` is the front door.

Usage::

    from alexnet_train.data import public

    public.tiny_imagenet("data/tiny-imagenet-200")

A module here holds its dataset's :class:`~alexnet_train.data.integrity.Archive` (where the
file is published and its checksum), the function that lays the archive out as
``DIR/train/<wnid>/*`` (and ``val``, ``synset_words.txt``) through a
:class:`~alexnet_train.data.staging.Layout`, and the entry point ``alexnet-data`` calls.
They import the shared modules (``transport``, ``integrity``, ``archives``, ``staging``),
never each other nor ``public``.  A new dataset is a new module here, its name
re-exported by ``public`` and a subcommand in ``cli.data_main``.
"""
