"""Client plumbing shared by teachers and question LLMs: local transformers models (`hf`) and OpenAI-compatible
servers (`openai_chat`). Nothing here knows about questions, labels or training."""
