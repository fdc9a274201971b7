"""The Open Inference Protocol with real clients nobody here wrote: `tritonclient[http]`
(binary and JSON tensors, batches, requested outputs, every error) and the `kserve` SDK's v2
REST client. Every map they receive equals `metauas segment`'s, bit for bit."""

import asyncio
import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as th
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from PIL import Image
from tritonclient.utils import InferenceServerException

from conftest import SIZE


def client(server):
    return th.InferenceServerClient(server.addr, network_timeout=120)


def image_input(paths, binary=True):
    blobs = np.array([p.read_bytes() for p in paths], dtype=np.object_)
    inp = th.InferInput("image", [len(paths)], "BYTES")
    inp.set_data_from_numpy(blobs, binary_data=binary)
    return inp


def pixels_of(paths):
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def thresholds(server):
    with urllib.request.urlopen(server.url + "/v1/products") as r:
        products = {p["name"]: p for p in json.load(r)["products"]}
    return products["bottle"]["calibration"]


def check_against_segment(setup, paths, maps, scores, anomalous=None, image_threshold=None):
    assert maps.dtype == np.float32 and maps.shape == (len(paths), SIZE, SIZE)
    for i, p in enumerate(paths):
        ref, line = setup.reference[p.name]
        assert np.array_equal(maps[i], ref), f"{p.name}: map differs from metauas segment"
        assert scores[i] == np.float32(line["score"])
        if anomalous is not None:
            assert bool(anomalous[i]) == line["verdict"]["anomalous"]
            assert bool(anomalous[i]) == (float(scores[i]) >= image_threshold)


def test_health_metadata_and_index(server):
    c = client(server)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("bottle") and c.is_model_ready("cable")
    assert not c.is_model_ready("broken")
    meta = c.get_server_metadata()
    assert meta["name"] == "metauas"
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    m = c.get_model_metadata("bottle")
    assert m["versions"] == ["1"]
    outputs = {o["name"]: o for o in m["outputs"]}
    assert outputs["anomaly_map"] == {"name": "anomaly_map", "datatype": "FP32", "shape": [-1, SIZE, SIZE]}
    assert set(outputs) == {"anomaly_map", "score", "anomalous", "regions"}
    assert {i["name"] for i in m["inputs"]} == {"image", "pixels"}
    # An uncalibrated product has no verdict outputs.
    assert {o["name"] for o in c.get_model_metadata("cable")["outputs"]} == {"anomaly_map", "score"}
    index = {e["name"]: e for e in c.get_model_repository_index()}
    assert index["bottle"]["state"] == "READY" and index["bottle"]["version"] == "1"
    assert index["broken"]["state"] == "UNAVAILABLE" and "reason" in index["broken"]
    assert index["empty"]["state"] == "UNAVAILABLE" and "version folder" in index["empty"]["reason"]


def test_binary_image_batch_of_four(server, setup):
    c = client(server)
    paths = setup.query_files[:4]
    r = c.infer("bottle", [image_input(paths)], request_id="batch-4")
    assert r.get_response()["id"] == "batch-4"
    t = thresholds(server)
    check_against_segment(setup, paths, r.as_numpy("anomaly_map"), r.as_numpy("score"),
                          r.as_numpy("anomalous"), t["image_threshold"])
    regions = [json.loads(x) for x in r.as_numpy("regions")]
    for p, regs in zip(paths, regions):
        assert regs == setup.reference[p.name][1]["regions"]


def test_json_pixels_and_json_outputs(server, setup):
    c = client(server)
    paths = setup.query_files[4:6]
    px = pixels_of(paths)
    inp = th.InferInput("pixels", list(px.shape), "UINT8")
    inp.set_data_from_numpy(px, binary_data=False)
    outs = [th.InferRequestedOutput(n, binary_data=False) for n in ("anomaly_map", "score")]
    r = c.infer("bottle", [inp], outputs=outs)
    raw = r.get_response()
    assert all("data" in o for o in raw["outputs"])
    check_against_segment(setup, paths, r.as_numpy("anomaly_map"), r.as_numpy("score"))
    # BYTES in the JSON form: base64 strings (an encoded image is not UTF-8 text).
    body = json.dumps({"inputs": [{
        "name": "image", "datatype": "BYTES", "shape": [len(paths)],
        "data": [base64.b64encode(p.read_bytes()).decode() for p in paths],
    }]}).encode()
    req = urllib.request.Request(server.url + "/v2/models/bottle/infer", data=body,
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        out = {o["name"]: o for o in json.load(resp)["outputs"]}
    maps = np.array(out["anomaly_map"]["data"], dtype=np.float32).reshape(out["anomaly_map"]["shape"])
    check_against_segment(setup, paths, maps, np.array(out["score"]["data"], dtype=np.float32))


def test_requested_outputs_only(server, setup):
    c = client(server)
    r = c.infer("bottle", [image_input(setup.query_files[:1])],
                outputs=[th.InferRequestedOutput("score")])
    names = [o["name"] for o in r.get_response()["outputs"]]
    assert names == ["score"]
    assert r.as_numpy("score")[0] == np.float32(setup.reference["q0.png"][1]["score"])
    # The versioned route serves the same.
    r = c.infer("bottle", [image_input(setup.query_files[:1])], model_version="1",
                outputs=[th.InferRequestedOutput("score")])
    assert r.as_numpy("score")[0] == np.float32(setup.reference["q0.png"][1]["score"])


def expect_error(status, needle, f):
    with pytest.raises(InferenceServerException) as e:
        f()
    assert e.value.status() == str(status), e.value
    assert needle in e.value.message(), e.value.message()
    assert "\n" not in e.value.message()


def test_every_error(server, setup):
    c = client(server)
    q = [image_input(setup.query_files[:1])]
    expect_error(404, "unknown model", lambda: c.infer("nope", q))
    expect_error(404, "version", lambda: c.infer("bottle", q, model_version="7"))
    expect_error(503, "unavailable", lambda: c.infer("broken", q))
    expect_error(404, "unknown model", lambda: c.get_model_metadata("nope"))
    bad = th.InferInput("picture", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    expect_error(400, "unknown input", lambda: c.infer("bottle", [bad]))
    wrong = th.InferInput("pixels", [1, 4, 4, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 4, 4, 3), np.float32))
    expect_error(400, "must be UINT8", lambda: c.infer("bottle", [wrong]))
    shape = th.InferInput("pixels", [1, 4, 4], "UINT8")
    shape.set_data_from_numpy(np.zeros((1, 4, 4), np.uint8))
    expect_error(400, "shape", lambda: c.infer("bottle", [shape]))
    junk = th.InferInput("image", [1], "BYTES")
    junk.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    expect_error(400, "element 0", lambda: c.infer("bottle", [junk]))
    expect_error(400, "calibrated", lambda: c.infer(
        "cable", q, outputs=[th.InferRequestedOutput("anomalous")]))
    expect_error(400, "unknown output", lambda: c.infer(
        "bottle", q, outputs=[th.InferRequestedOutput("heatmap")]))
    expect_error(400, "exactly one input", lambda: c.infer("bottle", q + q))
    # Too many images: refused from the shape, before anything is decoded.
    many = th.InferInput("image", [300], "BYTES")
    many.set_data_from_numpy(np.array([b"x"] * 300, dtype=np.object_))
    expect_error(400, "1 to 256 images", lambda: c.infer("bottle", [many]))


def test_v2_routes_are_exact(server):
    for path in ("/v2anything", "/v2/models", "/v2/models/bottle/nope"):
        try:
            urllib.request.urlopen(server.url + path)
            raise AssertionError(f"{path} answered 200")
        except urllib.error.HTTPError as e:
            assert e.code == 404, (path, e.code)


def test_repository_unload_and_load(server):
    c = client(server)
    c.unload_model("cable")
    assert not c.is_model_ready("cable")
    index = {e["name"]: e for e in c.get_model_repository_index()}
    assert index["cable"]["state"] == "UNAVAILABLE"
    c.load_model("cable")
    assert c.is_model_ready("cable")
    with pytest.raises(InferenceServerException):
        c.load_model("broken")


def test_products_written_to_the_repository(server, setup):
    c = client(server)
    url = server.url + "/v1/products/fresh/prompts?name=first"
    body = (setup.normal / "good1.png").read_bytes()
    req = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(req) as r:
        assert r.status == 201
        answer = json.load(r)
    assert answer["version"] == 1 and answer["prompts"] == 1
    assert (server.repo / "fresh" / "1" / "bank.safetensors").is_file()
    assert c.is_model_ready("fresh")
    req = urllib.request.Request(server.url + "/v1/products/fresh/prompts?name=second",
                                 data=(setup.normal / "good2.png").read_bytes(), method="POST")
    with urllib.request.urlopen(req) as r:
        assert json.load(r)["version"] == 2
    assert c.get_model_metadata("fresh")["versions"] == ["2"]
    # No staging folders are left behind.
    assert sorted(p.name for p in (server.repo / "fresh").iterdir()) == ["1", "2"]
    # The served product equals `segment` with the bank written.
    ref = setup.references(server.repo / "fresh" / "2" / "bank.safetensors", "fresh")
    r = c.infer("fresh", [image_input(setup.query_files[:2])])
    for i, p in enumerate(setup.query_files[:2]):
        assert np.array_equal(r.as_numpy("anomaly_map")[i], ref[p.name][0])


def test_kserve_v2_rest_client(server, setup):
    async def go():
        c = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=120))
        base = server.url
        assert await c.is_server_live(base) and await c.is_server_ready(base)
        assert await c.is_model_ready(base, "bottle")
        paths = setup.query_files[:3]
        px = pixels_of(paths)
        results = []
        for binary in (False, True):
            inp = InferInput("pixels", list(px.shape), "UINT8")
            inp.set_data_from_numpy(px, binary_data=binary)
            r = await c.infer(base, InferRequest(model_name="bottle", infer_inputs=[inp]),
                              model_name="bottle")
            results.append({o.name: o.as_numpy() for o in r.outputs})
        await c.close()
        return paths, results

    paths, results = asyncio.run(go())
    for out in results:
        check_against_segment(setup, paths, out["anomaly_map"], out["score"])
