"""Many SAEs from one pass over the cache (`make sweep SWEEP=configs/sweeps/<name>.yaml`).

`spec`: the sweep file, its members and their resolved configs; `onepass`: every member steps on
each batch read once; `memory`: the estimate checked before a sweep starts; `run`: the sweep from
start to summary, under torchrun too.
"""
