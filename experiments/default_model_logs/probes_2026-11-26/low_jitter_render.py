# experiment only: object centers drawn from the middle quarter of their allowed range
import logging; logging.basicConfig(level=logging.INFO)
import pixsigma.toy.render as R
orig = R._axis_range
def shrunk(index, half, f=0.25):
    lo, hi = orig(index, half)
    mid, w = (lo + hi) / 2, (hi - lo) * f / 2
    return (mid - w, mid + w) if lo <= hi else (lo, hi)
R._axis_range = shrunk
R.write_dataset('runs/exp/data_jit', 10000, seed=1, size=64)
