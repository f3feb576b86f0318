"""Chat about an image: ``python chat.py --image panel.jpg [--prompt "What is the asset code?"]``.

The command lives in vlm/chat.py (installed as ``vlm-chat``); this file runs it from a checkout.
"""

import sys

from vlm.chat import main

if __name__ == "__main__":
    sys.exit(main())
