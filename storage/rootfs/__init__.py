"""The files inside images: index each layer's tar once, merge the layers, read files lazily.

`members` is the record one layer's index yields per tar entry; `index`/`cache` build and
keep those tables (with the seek points that make reads lazy); `merge` applies the OCI layer
rules to a stack of tables. Nothing here imports FUSE: the view in `regfs/` sits on top.
"""
