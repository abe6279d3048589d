"""HTTP request and response bodies (ours and the OpenAI-compatible ones)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from neuroada_server.generation import Finished, SamplingParams
from neuroada_server.structured import Structure
from neuroada_server.tools import tool_structure


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # of the prompt, whose keys and values came from the prefix cache


class Usage(BaseModel):  # OpenAI's usage object, also /generate's
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    @classmethod
    def of(cls, choices: list[Finished], n: int = 1) -> Usage:
        """One request's usage: each prompt counted once (its `n` choices follow each other), every
        choice's completion."""
        prompts = choices[::n]
        prompt, completion = sum(p.prompt_tokens for p in prompts), sum(done.completion_tokens for done in choices)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(p.cached_tokens for p in prompts)),
        )


MIN_TEMPERATURE = 0.01  # below it logits / temperature overflow float32; 0 means greedy


def _greedy_or_sampling(t: float) -> float:
    if 0 < t < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return t


Temperature = Annotated[
    float,
    Field(ge=0.0, le=5.0, description=f"0 = greedy, else {MIN_TEMPERATURE} to 5"),
    AfterValidator(_greedy_or_sampling),
]


MAX_SPEC_CHARS = 65_536  # a schema's JSON text, a regex or a grammar
MAX_CHOICES_LISTED = 256  # structured_outputs.choice
MAX_STOP_TOKEN_IDS = 64


def _json_text(schema: dict | str) -> str:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"the schema's JSON text is over {MAX_SPEC_CHARS} characters")
    return text


SchemaText = Annotated[dict[str, Any] | str, AfterValidator(_json_text)]  # a JSON schema, kept as its JSON text
SchemaObject = Annotated[dict[str, Any], AfterValidator(_json_text)]  # the same, given as an object only


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: the text must follow exactly one of these."""

    model_config = ConfigDict(extra="forbid")

    json_schema: SchemaText | None = Field(None, alias="json", description="a JSON schema (an object, or its text)")
    json_object: Literal[True] | None = Field(None, description="any JSON object")
    regex: str | None = Field(None, min_length=1, max_length=MAX_SPEC_CHARS)
    choice: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES_LISTED, description="the text is one of these"
    )
    grammar: str | None = Field(None, min_length=1, max_length=MAX_SPEC_CHARS, description="an EBNF grammar")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [f.alias or name for name, f in type(self).model_fields.items() if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of json, json_object, regex, choice, grammar (given: {given or 'none'})"
            )
        return self

    @property
    def structure(self) -> Structure:
        if self.json_schema is not None:
            return Structure("json_schema", self.json_schema)
        if self.json_object:
            return Structure("json_object")
        if self.regex is not None:
            return Structure("regex", self.regex)
        if self.choice is not None:
            return Structure("choice", json.dumps(self.choice))
        return Structure("grammar", self.grammar)


class SamplingFields(BaseModel):
    temperature: Temperature = 0.0
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000, description="0 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="stop strings (at most 8)")
    stream: bool = False
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token (benchmarks)")
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="drop the request if still queued after this long (the server's request_timeout_s caps it)",
    )
    structured_outputs: StructuredOutputs | None = Field(None, description="a structure the text must follow")
    # The same under vLLM's names before `structured_outputs` (its 0.10 and earlier), which clients still send.
    guided_json: SchemaText | None = Field(None, description="structured_outputs.json, by its old name")
    guided_regex: str | None = Field(
        None, min_length=1, max_length=MAX_SPEC_CHARS, description="structured_outputs.regex, by its old name"
    )
    guided_choice: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES_LISTED, description="structured_outputs.choice, by its old name"
    )
    guided_grammar: str | None = Field(
        None, min_length=1, max_length=MAX_SPEC_CHARS, description="structured_outputs.grammar, by its old name"
    )
    # vLLM's sampling parameters beyond OpenAI's, on every generation endpoint.
    repetition_penalty: float = Field(
        1.0,
        ge=0.01,  # logits stay finite (as MIN_TEMPERATURE keeps them)
        le=10.0,
        description="a prompt's or generated token's logit is divided by it where positive, multiplied where "
        "negative; above 1 discourages repeating",
    )
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, description="sample no token less likely than min_p times the most likely one"
    )
    min_tokens: int = Field(
        0, ge=0, description="tokens generated before end-of-sequence, stop_token_ids or stop strings can end the text"
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="token ids that end the text, as end-of-sequence does"
    )

    @model_validator(mode="after")
    def _guided_as_structured_outputs(self):
        guided = {name: getattr(self, f"guided_{name}") for name in ("json", "regex", "choice", "grammar")}
        guided = {name: value for name, value in guided.items() if value is not None}
        if not guided:
            return self
        if len(guided) > 1 or self.structured_outputs is not None:
            given = [f"guided_{name}" for name in guided] + (["structured_outputs"] if self.structured_outputs else [])
            raise ValueError(f"give one structure, not {' and '.join(given)}")
        self.structured_outputs = StructuredOutputs(**guided)
        return self

    @property
    def structure(self) -> Structure | None:
        """The structure the text must follow, if the request gives one."""
        return self.structured_outputs.structure if self.structured_outputs is not None else None

    def sampling(
        self, max_new_tokens: int, logprobs: int | None = None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(s for s in stops if s),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            repetition_penalty=self.repetition_penalty,
            min_p=self.min_p,
            min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
        )


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=200_000)
    adapter: str | None = Field(None, description="adapter name; none = the base model")
    max_new_tokens: int = Field(64, ge=1)


class GenerateResponse(BaseModel):
    text: str
    adapter: str | None
    finish_reason: str
    usage: Usage


MAX_LOGPROBS = 20  # most likely tokens a response may list per position (OpenAI's limit)
MAX_CHOICES = 16  # `n`: each choice is a request of its own in the batch
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's limit)
MAX_PROMPTS = 64  # prompts of one /v1/completions request (a batch of them: lm-eval sends its batch so)


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="a last chunk, before [DONE], with the request's usage")


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchema(BaseModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: SchemaText = Field(..., alias="schema")
    strict: bool | None = Field(None, description="ignored: the schema is always enforced")


class JsonSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class OpenAISamplingFields(SamplingFields):
    """OpenAI's sampling fields; those we do not implement are accepted at their defaults only, and
    refused otherwise (422), never silently ignored."""

    temperature: Temperature = 1.0
    stream_options: StreamOptions | None = Field(None, description="with stream: include_usage")
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _stream_options_with_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream true")
        return self

    @model_validator(mode="after")
    def _one_structure(self):
        if isinstance(self.response_format, (JsonObjectFormat, JsonSchemaFormat)) and self.structured_outputs:
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    @property
    def structure(self) -> Structure | None:
        if isinstance(self.response_format, JsonObjectFormat):
            return Structure("json_object")
        if isinstance(self.response_format, JsonSchemaFormat):
            return Structure("json_schema", self.response_format.json_schema.json_schema)
        return super().structure

    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices to generate (with a seed, choice i uses seed + i)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted from a generated token's logit")
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="times a token's count so far, subtracted from its logit"
    )
    logit_bias: dict[Annotated[str, Field(pattern=r"^\d{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None = (
        Field(None, max_length=MAX_LOGIT_BIAS, description="token id -> bias added to its logit before sampling")
    )
    user: str | None = None

    def sampling(
        self, max_new_tokens: int, logprobs: int | None = None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        return replace(
            super().sampling(max_new_tokens, logprobs, prompt_logprobs),
            logit_bias=tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items()),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(OpenAISamplingFields):
    model: str
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(..., description=f"a prompt, as text or token ids, or a list of up to {MAX_PROMPTS} of them")
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="each generated token's log-probability and the n most likely"
    )
    echo: bool = Field(False, description="the prompt before each choice's text (with logprobs: its tokens' too)")
    best_of: Literal[1] | None = Field(None, description="not supported: 1 only")
    suffix: None = Field(None, description="not supported")

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, each text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return self.prompt


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


def _joined(content: str | list[TextPart] | None) -> str | None:
    return "".join(part.text for part in content) if isinstance(content, list) else content


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart] | None, AfterValidator(_joined)] = Field(
        None, description="text, or text parts (joined); none only in an assistant message with tool_calls"
    )
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant message's calls")
    tool_call_id: str | None = Field(None, description="a tool message's: the call it answers")

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content: a {self.role} message needs it (only an assistant's tool calls stand alone)")
        return self


MAX_TOOLS = 128


class FunctionDefinition(BaseModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: SchemaObject | None = Field(None, description="a JSON schema of the arguments (none: no arguments)")
    strict: bool | None = Field(None, description="ignored: a called function's parameters are always enforced")


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


def _template_function(function: FunctionDefinition) -> dict:
    described = {"description": function.description} if function.description else {}
    parameters = {"parameters": json.loads(function.parameters)} if function.parameters else {}
    return {"name": function.name} | described | parameters


class ChatCompletionRequest(OpenAISamplingFields):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="each generated token's log-probability")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the n most likely tokens at each position"
    )
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description='"required" or a named function (held to the parameters\' schemas), "auto" (the default with '
        'tools: the server\'s --tool-call-parser reads calls from the text), or "none"',
    )
    parallel_tool_calls: bool = Field(True, description='with tool_choice "required": more than one call allowed')

    @model_validator(mode="after")
    def _a_tool_choice_we_can_follow(self):
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: two functions share a name")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: there are no tools to choose from")
        if self.named_tool is not None and self.named_tool not in names:
            raise ValueError(f"tool_choice: no tool is named {self.named_tool!r}")
        if self.calls_tools and super().structure is not None:
            raise ValueError("give tool calls or a response_format / structured_outputs, not both")
        return self

    @property
    def named_tool(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    @property
    def auto_tools(self) -> bool:
        """The model answers in text or with calls in its own format, as it decides."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    @property
    def calls_tools(self) -> bool:
        """The answer is tool calls: the text is held to the tools' parameter schemas."""
        return self.tool_choice == "required" or self.named_tool is not None

    @property
    def structure(self) -> Structure | None:
        if self.calls_tools:
            functions = {tool.function.name: tool.function.parameters for tool in self.tools}
            return tool_structure(functions, self.named_tool, self.parallel_tool_calls)
        return super().structure

    @property
    def template_tools(self) -> list[dict] | None:
        """The tools as a chat template takes them (transformers' `tools`), unless tool_choice is none."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [{"type": "function", "function": _template_function(tool.function)} for tool in self.tools]

    @property
    def logprobs_n(self) -> int | None:
        """SamplingParams.logprobs: None (off), or how many most likely tokens to list."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str


class ErrorResponse(BaseModel):
    """Every error, in the OpenAI shape (the official client parses it)."""

    error: ErrorDetail


_ERROR_STATUSES = {
    400: "bad request",
    401: "missing or wrong bearer token",
    404: "unknown adapter or model",
    408: "the request's own timeout_s passed while it was queued",
    413: "body, upload or prompt over its limit",
    422: "invalid field (a temperature below 0.01, a prompt past the context, ...), or an adapter file refused",
    429: "queue full, uploads at max_concurrent_uploads, or a deep health check running (see Retry-After)",
    500: "generation failed (this request only: e.g. non-finite logits from its adapter)",
    503: "not ready, or shutting down",
    504: "the server's request_timeout_s passed while it was queued",
}
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": text} for status, text in _ERROR_STATUSES.items()
}
# Generation endpoints answer JSON, or server-sent events when the body asks for stream=true.
STREAMING_RESPONSE: dict[int | str, dict] = {
    200: {"description": "the result, or with stream=true its events", "content": {"text/event-stream": {}}}
}


MAX_DETOKENIZE = 1 << 17  # token ids one /detokenize request may send


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or a conversation as the chat template renders it."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="an adapter or the base model (all share the tokenizer)")
    prompt: str | None = Field(None, max_length=200_000)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(
        False, description="a prompt's: as the tokenizer would add them (generation does not)"
    )
    add_generation_prompt: bool = Field(
        True, description="messages': the assistant's turn opened, as chat generation does"
    )
    return_token_strs: bool = Field(False, description="each token's text too")

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt, messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None = Field(description="the model's context length, where it declares one")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="an adapter or the base model (all share the tokenizer)")
    tokens: list[Annotated[int, Field(ge=0)]] = Field(..., max_length=MAX_DETOKENIZE)


class DetokenizeResponse(BaseModel):
    prompt: str
