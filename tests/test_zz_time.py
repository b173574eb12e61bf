import time, threading, sys, gc
import pytest
from test_attention_varlen import _packed, _compare

@pytest.mark.triton
def test_time():
    args = _packed([1, 2, 1, 3], [300, 5, 129, 40], heads=8, kv_heads=2, v_dim=24)
    print("THREADS", threading.enumerate(), sys.getswitchinterval(), gc.get_threshold(), gc.get_count(), len(gc.get_objects()), sys.getrecursionlimit(), len(sys.modules))
    t = time.time(); _compare("triton", args, dropout_p=0.3, seed=5); t2 = time.time() - t
    print("AFTER", gc.get_stats()[2], "TIMES", round(t2, 1))
