"""A tiny Llama + byte-level BPE tokenizer trained on a few greetings: real models, no downloads."""
from __future__ import annotations

from pathlib import Path

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<pad>"
INSTRUCTION = "你现在是一个送祝福大师，帮我针对不同人和事情、节日送对应的祝福"

RECORDS = [
    {"instruction": INSTRUCTION, "input": "祝姐姐生日快乐,小红书风格", "output": "姐姐生日快乐呀🎂愿你永远被温柔以待✨"},
    {"instruction": INSTRUCTION, "input": "祝赵老师元宵节快乐,严肃风格", "output": "尊敬的赵老师，祝您元宵佳节阖家团圆，万事顺遂。"},
    {"instruction": INSTRUCTION, "input": "祝妈妈母亲节快乐,正常风格", "output": "妈妈，母亲节快乐！谢谢您一直以来的爱。"},
    {"instruction": INSTRUCTION, "input": "祝同事新年快乐,正常风格", "output": "新年快乐！愿新的一年工作顺利，身体健康。"},
    {"instruction": INSTRUCTION, "input": "祝爷爷中秋节快乐,严肃风格", "output": "爷爷，中秋快乐，祝您福如东海，寿比南山。"},
    {"instruction": INSTRUCTION, "input": "祝好友毕业快乐,小红书风格", "output": "毕业快乐🎓前路浩荡，未来可期！冲鸭～"},
    {"instruction": INSTRUCTION, "input": "祝王总开业大吉,严肃风格", "output": "恭祝王总开业大吉，生意兴隆，财源广进。"},
    {"instruction": INSTRUCTION, "input": "祝老婆情人节快乐,小红书风格", "output": "老婆情人节快乐💕余生请多指教呀～"},
    {"instruction": INSTRUCTION, "input": "祝弟弟高考顺利,正常风格", "output": "弟弟，高考加油！相信你一定能金榜题名。"},
    {"instruction": INSTRUCTION, "input": "祝李阿姨春节快乐,正常风格", "output": "李阿姨，春节快乐！祝您新春大吉，阖家幸福。"},
    {"instruction": INSTRUCTION, "input": "祝客户端午安康,严肃风格", "output": "值此端午佳节，谨祝您端午安康，事业蒸蒸日上。"},
    {"instruction": INSTRUCTION, "input": "祝闺蜜乔迁之喜,小红书风格", "output": "乔迁快乐🏠新家新气象，好运满满哦～"},
    {"instruction": "", "input": "Say hi in English", "output": "Hi there! Happy holidays :)"},
]


def build_tiny(dir_: str | Path, *, chat_template: bool = True, seed: int = 0) -> Path:
    """Train the tokenizer, build the model, save both to dir_; return dir_ (load with from_pretrained)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = Path(dir_)
    d.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [f"User: {r['instruction']}{r['input']}\n\nAssistant: {r['output']}" for r in RECORDS]
    tk.train_from_iterator(texts * 4, trainers.BpeTrainer(
        vocab_size=600, special_tokens=[BOS, EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if chat_template:
        # DeepSeek-LLM chat's template, so `auto` and `deepseek` can be compared on this tokenizer.
        tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
                             "{% else %}{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                             "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
    tok.save_pretrained(d)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d
