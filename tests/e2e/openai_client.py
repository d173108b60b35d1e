"""The official `openai` Python package against a running llmroute sidecar, unchanged.

Run by scripts/test-e2e, which starts replay-llm and the sidecar and sets:
LLMROUTE_BASE_URL (the sidecar, without /v1), LLMROUTE_BIN (the llmroute binary),
LLMROUTE_POLICY (the policy file the sidecar serves), LLMROUTE_ROUTE (the routed model name),
LLMROUTE_PROMPTS (a JSON file with recorded prompts) and LLMROUTE_EXPECTED (where to write the
decision ids and feedback scores that the events file must contain).

`python3 openai_client.py check-events EVENTS EXPECTED` checks the stored events after the sidecar
stopped; EVENTS is the control plane's SQLite database or a JSON Lines events file.
"""

import json
import os
import subprocess
import sys
import unittest
import urllib.error
import urllib.request


def decide(prompt, preference):
    """Returns the model that `llmroute decide` picks from the policy file."""
    output = subprocess.run(
        [
            os.environ["LLMROUTE_BIN"],
            "decide",
            "--policy",
            os.environ["LLMROUTE_POLICY"],
            "--prompt",
            prompt,
            "--preference",
            preference,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(output.stdout)["model"]


def post_feedback(decision_id, score):
    """Posts feedback to the sidecar and returns the HTTP status and JSON body."""
    request = urllib.request.Request(
        os.environ["LLMROUTE_BASE_URL"] + "/v1/feedback",
        data=json.dumps({"decision_id": decision_id, "score": score}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class SidecarWithOpenAIClient(unittest.TestCase):
    expected = {}

    @classmethod
    def setUpClass(cls):
        import openai

        cls.openai = openai
        cls.client = openai.OpenAI(
            base_url=os.environ["LLMROUTE_BASE_URL"] + "/v1",
            api_key="not-used-by-the-sidecar",
            max_retries=0,
            timeout=60,
        )
        cls.route = os.environ["LLMROUTE_ROUTE"]
        with open(os.environ["LLMROUTE_PROMPTS"]) as file:
            cls.prompts = json.load(file)

    @classmethod
    def tearDownClass(cls):
        with open(os.environ["LLMROUTE_EXPECTED"], "w") as file:
            json.dump(cls.expected, file)

    def chat(self, prompt, preference, **kwargs):
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.route,
            messages=[{"role": "user", "content": prompt}],
            extra_headers={"x-llmroute-preference": preference},
            **kwargs,
        )
        return raw, raw.parse()

    def test_routed_chat_matches_policy(self):
        models = set()
        for index, quality in [(0, 0.0), (1, 1.0), (2, 0.5), (3, 0.1), (4, 0.9)]:
            prompt = self.prompts[index]
            preference = f"quality={quality}"
            raw, completion = self.chat(prompt, preference)
            model = raw.headers["x-llmroute-model"]
            self.assertEqual(model, decide(prompt, preference), f"prompt {index}")
            self.assertEqual(raw.headers["x-llmroute-routed"], "true")
            self.assertEqual(raw.headers["x-llmroute-propensity"], "1")
            self.assertTrue(completion.choices[0].message.content.startswith(f"Recorded outcome of {model}"))
            self.assertGreater(completion.usage.prompt_tokens, 0)
            self.assertGreater(float(raw.headers["x-llmroute-cost-usd"]), 0.0)
            decision_id = raw.headers["x-llmroute-decision-id"]
            score = float(raw.headers["x-replay-quality"])
            status, body = post_feedback(decision_id, score)
            self.assertEqual(status, 200, body)
            self.expected[decision_id] = score
            models.add(model)
        print(f"routed chat: {len(models)} distinct models chosen", file=sys.stderr)

    def test_preference_in_body(self):
        prompt = self.prompts[5]
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.route,
            messages=[{"role": "user", "content": prompt}],
            extra_body={"llmroute_preference": {"quality": 0.2}},
        )
        self.assertEqual(raw.headers["x-llmroute-model"], decide(prompt, "quality=0.2"))
        self.expected[raw.headers["x-llmroute-decision-id"]] = None

    def test_streaming_hides_usage(self):
        prompt = self.prompts[6]
        stream = self.client.chat.completions.create(
            model=self.route,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertTrue(text.startswith("Recorded outcome of "), text)
        self.assertTrue(all(c.usage is None for c in chunks))
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")

    def test_streaming_with_usage(self):
        prompt = self.prompts[7]
        stream = self.client.chat.completions.create(
            model=self.route,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        self.assertEqual(chunks[-1].choices, [])
        self.assertGreater(chunks[-1].usage.completion_tokens, 0)

    def test_completions_endpoint(self):
        completion = self.client.completions.create(model=self.route, prompt=self.prompts[8])
        self.assertTrue(completion.choices[0].text.startswith("Recorded outcome of "))

    def test_models_list(self):
        ids = [model.id for model in self.client.models.list()]
        self.assertEqual(ids[0], self.route)
        self.assertGreater(len(ids), 1)

    def test_errors_raise_openai_exceptions(self):
        with self.assertRaises(self.openai.NotFoundError) as raised:
            self.client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
        self.assertEqual(raised.exception.code, "model_not_found")
        with self.assertRaises(self.openai.BadRequestError) as raised:
            self.chat(self.prompts[0], "quality=1.5")
        self.assertEqual(raised.exception.param, "x-llmroute-preference")
        self.assertIn("x-llmroute-preference header", str(raised.exception))
        with self.assertRaises(self.openai.NotFoundError) as raised:
            self.chat("a prompt that the data set does not contain", "quality=0.5")
        self.assertEqual(raised.exception.code, "prompt_not_recorded")
        status, body = post_feedback("0" * 32, 0.5)
        self.assertEqual(status, 404)
        self.assertEqual(body["error"]["code"], "decision_not_found")


def read_events(path):
    """Reads completed events from the control plane's SQLite database or a JSON Lines file."""
    if path.endswith(".sqlite3"):
        import array
        import sqlite3

        events = []
        with sqlite3.connect(path) as connection:
            for text, blob in connection.execute("SELECT event, embedding FROM events ORDER BY id"):
                event = json.loads(text)
                # Schema version 2 stores the embedding as little-endian f32 values in its own
                # column and leaves the JSON's embedding empty.
                if blob is not None:
                    values = array.array("f")
                    values.frombytes(blob)
                    if sys.byteorder != "little":
                        values.byteswap()
                    event["embedding"] = values.tolist()
                events.append(event)
        return events
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def check_events(events_path, expected_path):
    """Checks that every expected decision left one event with the feedback score."""
    with open(expected_path) as file:
        expected = json.load(file)
    events = read_events(events_path)
    by_id = {event["decision"]["decisionId"]: event for event in events}
    failures = []
    for decision_id, score in expected.items():
        event = by_id.get(decision_id)
        if event is None:
            failures.append(f"decision {decision_id} has no event")
            continue
        if event["quality"] != score:
            failures.append(f"decision {decision_id}: quality {event['quality']}, expected {score}")
        if len(event["embedding"]) != 384:
            failures.append(f"decision {decision_id}: embedding of {len(event['embedding'])} values")
        if event["decision"]["policyVersion"] != "v1" or event["decision"]["propensity"] != 1.0:
            failures.append(f"decision {decision_id}: decision {event['decision']}")
        if event["costUsd"] is None or event["costUsd"] <= 0:
            failures.append(f"decision {decision_id}: cost {event['costUsd']}")
    print(f"events: {len(events)} written, {len(expected)} checked, {len(failures)} failures")
    for failure in failures:
        print(f"  {failure}")
    passed = len(expected) - len({f.split(':')[0] for f in failures})
    print(f"{passed} passed, {len(expected) - passed} failed")
    return 1 if failures or not expected else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "check-events":
        sys.exit(check_events(sys.argv[2], sys.argv[3]))
    unittest.main(verbosity=2)
