"""Every example of the endpoint reference, sent as its curl command sends it."""

import base64

from tests.conftest import AUTH, download, images_body
from tests.fakes import FAKE_PNG, png_size


URL_GENERATIONS = "/v1/images/generations"


async def post(client, body):
    return await client.post("/v1/images/generations", json=body, headers=AUTH)


async def test_basic_generation(client, fake_openai):
    resp = await post(client, {"model": "dall-e-3", "prompt": "A cute baby sea otter wearing a tiny chef hat, preparing sushi", "n": 1, "size": "1024x1024"})
    body = await images_body(resp)
    assert len(body["data"]) == 1
    assert body["data"][0]["revised_prompt"].startswith("Revised: A cute baby sea otter")
    sent = fake_openai.requests[-1]
    assert sent["model"] == "dall-e-3" and sent["size"] == "1024x1024" and sent["n"] == 1
    assert sent["quality"] == "standard" and sent["style"] == "vivid"  # the reference's defaults, filled in
    # The image is hosted by imgproxy and downloadable from the returned URL.
    image = await download(client, body["data"][0]["url"])
    assert image.status == 200 and image.content_type == "image/png"
    assert await image.read() == FAKE_PNG


async def test_high_quality_landscape(client, fake_openai):
    resp = await post(client, {"model": "dall-e-3", "prompt": "A futuristic cyberpunk cityscape", "quality": "hd", "size": "1792x1024", "style": "vivid"})
    await images_body(resp)
    sent = fake_openai.requests[-1]
    assert (sent["quality"], sent["size"], sent["style"]) == ("hd", "1792x1024", "vivid")


async def test_natural_style_portrait(client, fake_openai):
    resp = await post(client, {"model": "dall-e-3", "prompt": "Professional portrait photograph", "size": "1024x1792", "style": "natural", "quality": "hd"})
    await images_body(resp)
    sent = fake_openai.requests[-1]
    assert (sent["quality"], sent["size"], sent["style"]) == ("hd", "1024x1792", "natural")


async def test_multiple_images_dall_e_2(client, fake_openai):
    resp = await post(client, {"model": "dall-e-2", "prompt": "Minimalist logo design for a tech startup", "n": 4, "size": "512x512"})
    body = await images_body(resp)
    assert len(body["data"]) == 4
    assert len({item["url"] for item in body["data"]}) == 4
    sent = fake_openai.requests[-1]
    assert (sent["n"], sent["size"]) == (4, "512x512")
    assert "style" not in sent


async def test_base64_response_format(client, fake_openai):
    resp = await post(client, {"model": "dall-e-3", "prompt": "Abstract geometric pattern in blue and gold", "response_format": "b64_json", "size": "1024x1024"})
    body = await images_body(resp)
    assert base64.b64decode(body["data"][0]["b64_json"]) == FAKE_PNG
    assert body["data"][0]["revised_prompt"].startswith("Revised:")
    assert fake_openai.requests[-1]["response_format"] == "b64_json"


async def test_provider_prefixed_openai(client, fake_openai):
    resp = await post(client, {"model": "openai/dall-e-3", "prompt": "A magical forest with glowing mushrooms"})
    await images_body(resp)
    assert fake_openai.requests[-1]["model"] == "dall-e-3"


async def test_provider_prefixed_stability(client, fake_stability):
    resp = await post(client, {"model": "stability/stable-diffusion-xl-1024-v1-0", "prompt": "A magical forest with glowing mushrooms"})
    body = await images_body(resp)
    assert len(body["data"]) == 1 and "url" in body["data"][0]
    assert fake_stability.engines == ["stable-diffusion-xl-1024-v1-0"]
    image = await download(client, body["data"][0]["url"])
    assert png_size(await image.read()) == (2, 2)


async def test_user_is_forwarded_and_gpt_image_parameters_pass_through(client, fake_openai):
    body = {
        "model": "gpt-image-1", "prompt": "a logo", "user": "user-1234", "background": "transparent",
        "output_format": "webp", "output_compression": 80, "quality": "high", "size": "1536x1024", "moderation": "auto",
    }
    result = await images_body(await client.post(URL_GENERATIONS, json=body, headers=AUTH))
    sent = fake_openai.requests[-1]
    assert {k: sent[k] for k in body} == {**body, "model": "gpt-image-1"}
    assert "response_format" not in sent
    assert result["output_format"] == "webp" and result["usage"]["total_tokens"] == 100
