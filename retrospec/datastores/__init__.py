"""Datastores: the on-disk formats drafts come from, each with its format, builder and reader.

``files`` holds what every format shares (manifests, checksums, atomic writes, memory
maps, ``--out`` checks, journaled publishing); ``suffix_index`` / ``suffix_build`` the corpus
suffix index, ``documents`` the document store, ``recycling`` the Token Recycling matrix
file, ``corpus`` the readers of input corpora.
"""
