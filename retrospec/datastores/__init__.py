"""Datastores: the on-disk formats drafts come from, each with its format, builder and reader.

``files`` holds what every format shares (manifests, checksums, atomic writes, memory
maps); ``suffix_index`` / ``suffix_build`` the corpus suffix index, ``documents`` the
document store, ``corpus`` the readers of input corpora.
"""
