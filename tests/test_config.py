"""HalfbyteConfig: BitsAndBytesConfig's fields, defaults, validation and serialization; registration."""

import json
import subprocess
import sys

import pytest
import torch
from halfbyte import HalfbyteConfig
from halfbyte.config import FIELDS

transformers = pytest.importorskip("transformers", reason="transformers not installed: HF integration not tested")
from transformers import BitsAndBytesConfig  # noqa: E402


def test_fields_and_defaults_are_bitsandbytes_ones():
    import inspect

    bnb_parameters = inspect.signature(BitsAndBytesConfig.__init__).parameters
    ours = inspect.signature(HalfbyteConfig.__init__).parameters
    bnb_fields = [name for name in bnb_parameters if name not in ("self", "kwargs")]
    assert [name for name, _ in FIELDS] == bnb_fields
    for name in bnb_fields:
        assert ours[name].default == bnb_parameters[name].default, name
    default = HalfbyteConfig()
    assert default.bnb_4bit_compute_dtype == torch.float32 and default.bnb_4bit_quant_storage == torch.uint8
    assert default.to_dict() == BitsAndBytesConfig().to_dict()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
         "bnb_4bit_compute_dtype": torch.bfloat16},
        {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16", "bnb_4bit_quant_storage": "bfloat16",
         "llm_int8_skip_modules": ["lm_head", "mlp.gate"], "llm_int8_enable_fp32_cpu_offload": True},
        {"load_in_8bit": True, "llm_int8_threshold": 5.0, "llm_int8_has_fp16_weight": True},
    ],
)  # fmt: skip
def test_saved_dict_is_exactly_bitsandbytes_and_round_trips(kwargs):
    ours, theirs = HalfbyteConfig(**kwargs), BitsAndBytesConfig(**kwargs)
    saved = ours.to_dict()
    assert saved == theirs.to_dict()  # the quantization_config of config.json, "quant_method": "bitsandbytes"
    assert saved["quant_method"] == "bitsandbytes" and ours.quant_method == "halfbyte"
    assert ours.to_diff_dict() == theirs.to_diff_dict()
    assert json.loads(ours.to_json_string(use_diff=False)) == saved
    assert HalfbyteConfig.from_dict(saved) == ours
    assert BitsAndBytesConfig.from_dict(json.loads(json.dumps(saved))).to_dict() == saved  # bitsandbytes reads it
    assert HalfbyteConfig.from_dict(theirs.to_dict()) == ours
    assert ours.quantization_method() == theirs.quantization_method()
    assert ours.is_quantizable() == theirs.is_quantizable()


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"load_in_4bit": True, "load_in_8bit": True}, ValueError, "load_in_4bit and load_in_8bit are both True"),
        ({"load_in_4bit": 1}, TypeError, "load_in_4bit must be True or False"),
        ({"bnb_4bit_quant_type": "int4"}, ValueError, "bnb_4bit_quant_type must be 'nf4' or 'fp4', got 'int4'"),
        ({"bnb_4bit_compute_dtype": "bfloat17"}, TypeError, "bnb_4bit_compute_dtype must be a torch.dtype"),
        ({"bnb_4bit_compute_dtype": torch.int8}, ValueError, "bnb_4bit_compute_dtype must be one of"),
        ({"bnb_4bit_quant_storage": "float64"}, ValueError, "bnb_4bit_quant_storage must be one of"),
        ({"bnb_4bit_use_double_quant": "yes"}, TypeError, "bnb_4bit_use_double_quant must be True or False"),
        ({"llm_int8_threshold": "6"}, TypeError, "llm_int8_threshold must be a float"),
        ({"llm_int8_threshold": -0.5}, ValueError, "llm_int8_threshold must be a finite number >= 0 .* got -0.5"),
        ({"llm_int8_threshold": float("inf")}, ValueError, "llm_int8_threshold must be a finite number >= 0"),
        ({"llm_int8_skip_modules": "lm_head"}, TypeError, "llm_int8_skip_modules must be a list"),
        ({"llm_int8_skip_modules": ["lm_head", 3]}, TypeError, "llm_int8_skip_modules must hold non-empty strings"),
        ({"bnb_4bit_quant_typ": "nf4"}, TypeError, "did you mean 'bnb_4bit_quant_type'"),
    ],
)
def test_bad_values_name_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        HalfbyteConfig(**kwargs)


def test_setting_fields_later_is_checked_too():
    config = HalfbyteConfig(load_in_4bit=True)
    with pytest.raises(ValueError, match="load_in_8bit cannot be True while load_in_4bit is True"):
        config.load_in_8bit = True
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        config.update(bnb_4bit_quant_type="nf5", bnb_4bit_use_double_quant=True)
    assert config.bnb_4bit_quant_type == "fp4" and not config.bnb_4bit_use_double_quant  # all or nothing
    assert config.update(bnb_4bit_compute_dtype="bfloat16", not_a_field=1) == {"not_a_field": 1}
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_from_dict_rejects_other_methods_and_ignores_unknown_keys(caplog):
    with pytest.raises(ValueError, match="quant_method must be 'bitsandbytes' or 'halfbyte', got 'gptq'"):
        HalfbyteConfig.from_dict({"quant_method": "gptq", "bits": 4})
    config = HalfbyteConfig.from_dict({"quant_method": "bitsandbytes", "_load_in_4bit": True, "future_field": 1})
    assert config.load_in_4bit and "future_field" in caplog.text
    config, unused = HalfbyteConfig.from_dict(
        {"load_in_4bit": True}, return_unused_kwargs=True, x=1, bnb_4bit_quant_type="nf4"
    )
    assert config.bnb_4bit_quant_type == "nf4" and unused == {"x": 1}


def test_registered_with_transformers_on_import():
    from halfbyte.integrations.transformers import HalfbyteHfQuantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoHfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["halfbyte"] is HalfbyteConfig
    assert AUTO_QUANTIZER_MAPPING["halfbyte"] is HalfbyteHfQuantizer
    assert isinstance(HalfbyteConfig(), QuantizationConfigMixin)
    quantizer = AutoHfQuantizer.from_config(HalfbyteConfig(load_in_4bit=True), pre_quantized=False)
    assert isinstance(quantizer, HalfbyteHfQuantizer) and quantizer.is_compileable
    # in a fresh interpreter, importing halfbyte alone registers it (transformers imported afterwards)
    code = (
        "import halfbyte\nfrom transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m\n"
        "print(m['halfbyte'].__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "HalfbyteHfQuantizer", result.stderr


def test_halfbyte_imports_without_transformers():
    # A meta-path blocker makes `import transformers` fail, as on a machine without it.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'transformers' or name.startswith('transformers.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import halfbyte\n"
        "config = halfbyte.HalfbyteConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4')\n"
        "print(config.to_dict()['bnb_4bit_quant_type'], 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["nf4", "False"]
