"""Multi-node scenarios on one machine (``ray.cluster_utils.Cluster``), each run in a child
process by ``tests/test_multinode.py``: ``python -m tests.multinode SCENARIO WORKDIR`` writes
``WORKDIR/result.json`` with what it observed, and the test asserts on it.

Why a child process: a scenario needs a Ray cluster of its own (a head and worker nodes it
can remove), while the suite's other tests share one local Ray started by the session
fixture in ``tests/conftest.py``. A driver connects to one cluster at a time, and shutting
the session's Ray down and restarting it in the middle of the suite would lose whatever
another module keeps in it (Serve applications, datasets). In a child process the
scenario's cluster never touches the session's Ray, a hang is bounded by the parent's
timeout, and the cluster's processes die with the child (``Cluster`` starts them with a
reaper that kills them when their parent exits).
"""
