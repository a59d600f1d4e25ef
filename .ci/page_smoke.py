"""CI, in the NumPy-only environment: `python draw.py` as a learner starts it,
then the page's calls a drawing makes (read, backward, teach), answered by
the NumPy twin alone. Usage: python .ci/page_smoke.py WEIGHTS"""

import http.client
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import data_utils  # noqa: E402


def main(weights):
    # Ctrl-C must reach draw.py even if this was started with SIGINT ignored
    # (an ignored signal stays ignored in a child; a handler does not).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    proc = subprocess.Popen([sys.executable, "draw.py", "--weights", weights], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("Serving the page at http://127.0.0.1:"), line + proc.stderr.read()
        assert "NumPy twin only" in line, line
        port = int(line.split("127.0.0.1:")[1].split("/")[0])

        def call(method, path, body=None, content_type="application/json"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request(method, path, body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            data = response.read()
            conn.close()
            assert response.status == 200, (path, response.status, data[:300])
            return data

        assert b"<canvas" in call("GET", "/")
        _, (x_test, y_test) = data_utils.load_dataset("mnist", progress=False)
        right = 0
        for i in range(10):
            png = io.BytesIO()
            Image.fromarray((255 - x_test[i, :, :, 0] * 255).astype(np.uint8)).resize(
                (140, 140)).save(png, format="PNG")          # dark ink on white, as drawn
            read = json.loads(call("POST", "/read", png.getvalue(), "image/png"))
            assert read["keras"] is None and len(read["numpy"]) == 10
            right += int(np.argmax(read["numpy"]) == y_test[i])
        request = json.dumps({"x": read["input"], "label": 3})
        backward = json.loads(call("POST", "/backward", request))
        teach = json.loads(call("POST", "/teach", request))
        assert backward and teach
        print(f"draw.py (NumPy twin only): the page, 10 test digits read ({right} right), "
              "backward and teach answered")
        assert right >= 8, right
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
