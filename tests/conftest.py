import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ACCEPT_CLUSTER_RESOURCE_LIMITS", "1")
sys.path.insert(0, str(Path(__file__).parent))
