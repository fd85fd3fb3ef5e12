"""The official openai SDK, unchanged, against imgproxy (and fake upstreams behind it)."""

import base64

import openai
import pytest

from tests.conftest import download
from tests.fakes import FAKE_PNG, png_size


@pytest.fixture
def sdk(client, sdk_for):
    return sdk_for(client)


async def test_dall_e_3_landscape_hd_natural(sdk, client, fake_openai):
    result = await sdk.images.generate(model="dall-e-3", prompt="A serene lake", size="1792x1024", quality="hd", style="natural")
    assert result.data[0].revised_prompt == "Revised: A serene lake"
    image = await download(client, result.data[0].url)
    assert await image.read() == FAKE_PNG
    assert fake_openai.requests[-1]["size"] == "1792x1024"


async def test_b64_json(sdk):
    result = await sdk.images.generate(model="dall-e-3", prompt="x", response_format="b64_json")
    assert base64.b64decode(result.data[0].b64_json) == FAKE_PNG


async def test_dall_e_2_four_images(sdk):
    result = await sdk.images.generate(model="dall-e-2", prompt="logo", n=4, size="512x512")
    assert len(result.data) == 4 and all(item.url for item in result.data)


async def test_stability_model(sdk, fake_stability):
    result = await sdk.images.generate(model="stability/stable-diffusion-xl-1024-v1-0", prompt="forest", response_format="b64_json")
    assert png_size(base64.b64decode(result.data[0].b64_json)) == (2, 2)
    assert fake_stability.requests[-1]["text_prompts"][0]["text"] == "forest"


async def test_placeholder_model(sdk):
    result = await sdk.images.generate(model="placeholder", prompt="a red bicycle", size="256x256", response_format="b64_json")
    assert png_size(base64.b64decode(result.data[0].b64_json)) == (256, 256)


async def test_gpt_image_stream(sdk):
    stream = await sdk.images.generate(model="gpt-image-1", prompt="x", stream=True, partial_images=1)
    kinds = [event.type async for event in stream]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"]


async def test_gpt_image_usage(sdk):
    result = await sdk.images.generate(model="gpt-image-1", prompt="x", quality="high", background="opaque")
    assert result.usage.total_tokens == 100 and result.data[0].b64_json


async def test_errors_raise_the_sdk_exceptions(sdk, client, sdk_for):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.images.generate(model="dall-e-3", prompt="x", size="256x256")
    assert caught.value.code == "invalid_size" and caught.value.param == "size"
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.images.generate(model="no-such-model", prompt="x")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.images.generate(model="dall-e-3", prompt="forbidden thing")
    assert caught.value.code == "content_policy_violation"
    wrong = sdk_for(client, "sk-wrong")
    with pytest.raises(openai.AuthenticationError) as caught:
        await wrong.images.generate(model="dall-e-3", prompt="x")
    assert caught.value.code == "invalid_api_key"
