"""Every user option of a transcription, defined once: type, range, alias and default.

The HTTP proxy (query parameters, SageMaker custom attributes, JSON body) and the Triton
`transcribe` model (its OPTIONS JSON) both parse with `parse_options`, so the same input gets the
same answer on every path. Strings are coerced as query strings need ("3" -> 3, "true" -> True,
"0,0.2" -> [0.0, 0.2]) on every path alike.

The option groups are models of their own (`VadOptions`, `QualityThresholds`, `DecodeOptions`),
used whole by the code that applies them (vad.py, decoding.py, the engines); the flat names users
know (`vad_threshold`, `no_speech_threshold`, ...) share the groups' constrained types and defaults,
so a range or a default is written in one place only.

Checks that depend on the served model (language, task, engine capabilities) are not here: the
pipeline runs them once, before any audio is decoded (`longform.LongFormTranscriber.check`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import WhisperTritonError, invalid_parameter
from .json_limits import shown_name

# ---- limits of the model and the service (one place) ------------------------------------------
MAX_NEW_TOKENS = 448  # Whisper's decoder context (n_text_ctx)
MAX_PROMPT_TOKENS = 223  # openai-whisper keeps the last n_text_ctx // 2 - 1 tokens of a prompt
MAX_BEAM_SIZE = 16
MAX_BATCH_SIZE = 64
MAX_TEMPERATURES = 16
MAX_PROMPT_CHARS = 8_192  # far above 223 tokens in any script; beyond it a prompt is refused, not cut
MAX_LANGUAGE_CHARS = 32
MAX_MODEL_ID_CHARS = 64
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
CHUNK_SECONDS = 30.0
# Ceilings on the options that multiply work (docs/hardening.md, "Option ranges that bound work"):
# windows per file = audio seconds / chunk_length, so chunk_length is at least MIN_CHUNK_SECONDS
# (0.0001 s turned 30 s into 300,000 windows); each window is decoded up to once per temperature,
# each decode with beam_size hypotheses, so their product is capped as well.
MIN_CHUNK_SECONDS = 1.0
MAX_WINDOW_DECODES = 96  # len(temperature) x beam_size: the 6 default temperatures at the largest beam
MAX_SPEAKERS = 16  # speakers one file may be diarized into
DEFAULT_MAX_SPEAKERS = 8
MAX_KNOWN_SPEAKERS = 4  # OpenAI's limit on known_speaker_names[] / known_speaker_references[]
MAX_SPEAKER_NAME_CHARS = 64
REFERENCE_SECONDS = (2.0, 10.0)  # OpenAI: each known speaker reference is 2-10 s of audio

# ---- constrained types shared by the groups and the flat request fields ------------------------
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
BeamSize = Annotated[int, Field(ge=1, le=MAX_BEAM_SIZE)]
NewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]
Patience = Annotated[float, Field(gt=0.0, le=10.0)]
LengthPenalty = Annotated[float, Field(ge=0.0, le=10.0)]
VadThreshold = Annotated[float, Field(gt=0.0, lt=1.0)]
Milliseconds = Annotated[int, Field(ge=0, le=10_000)]
PadMilliseconds = Annotated[int, Field(ge=0, le=2_000)]
Ratio = Annotated[float, Field(ge=0.0, le=1e6)]
LogProb = Annotated[float, Field(ge=-1e6, le=0.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
SpeakerCount = Annotated[int, Field(ge=1, le=MAX_SPEAKERS)]
SpeakerName = Annotated[str, Field(min_length=1, max_length=MAX_SPEAKER_NAME_CHARS)]


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VadOptions(_Group):
    """Silero VAD: what counts as speech and how much of its edges is kept (vad.py applies it)."""

    threshold: VadThreshold = 0.5
    min_speech_ms: Milliseconds = 250
    min_silence_ms: Milliseconds = 300  # a pause this long ends a speech segment
    speech_pad_ms: PadMilliseconds = 400  # before speech: soft or quiet onsets (s, f, h) sit below the threshold (faster-whisper pads 400)
    end_pad_ms: PadMilliseconds = 100  # after speech: endings are sharper; less trailing silence


class QualityThresholds(_Group):
    """openai-whisper's quality rules (decoding.py applies them); None turns a rule off."""

    compression_ratio: Ratio | None = 2.4
    log_prob: LogProb | None = -1.0
    no_speech: Probability | None = 0.6
    # a window whose every decode failed is left out when its language was detected (not given)
    # with less than this probability: the model did not know the language, so its text is guesswork
    unsure_language: Probability | None = 0.5


class DecodeOptions(_Group):
    """What one engine call decodes with (hashable: requests are grouped by it)."""

    beam_size: BeamSize = 1
    max_new_tokens: NewTokens = MAX_NEW_TOKENS
    temperature: Temperature = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    patience: Patience = 1.0
    length_penalty: LengthPenalty = 1.0
    suppress_blank: bool = True

    def validate(self, max_beam_size: int = MAX_BEAM_SIZE) -> "DecodeOptions":
        """The ranges were checked on construction; what is left depends on the engine's build."""
        return self.check_beam(max_beam_size)

    def check_beam(self, max_beam_size: int, why: str | None = None) -> "DecodeOptions":
        """Refuse a beam above what the engine can decode (its build, or `why` it decodes fewer)."""
        if self.beam_size > max_beam_size:
            raise invalid_parameter("beam_size", f"beam_size must be between 1 and {max_beam_size} on this engine, "
                                    f"got {self.beam_size}" + (f": {why}." if why else "."))
        return self


_VAD, _QUALITY, _DECODE = VadOptions.model_fields, QualityThresholds.model_fields, DecodeOptions.model_fields


class TranscribeOptions(BaseModel):
    """One long-form transcription; names as faster-whisper / openai-whisper users know them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    language: Annotated[str, Field(max_length=MAX_LANGUAGE_CHARS)] | None = None
    # which of the endpoint's models answers (contract/models.py: ids, aliases resolved by the proxy);
    # None: the default model
    model: Annotated[str, Field(max_length=MAX_MODEL_ID_CHARS)] | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    vad: bool = True
    chunk_length: Annotated[float, Field(ge=MIN_CHUNK_SECONDS, le=CHUNK_SECONDS)] = CHUNK_SECONDS
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] = 8
    beam_size: BeamSize = _DECODE["beam_size"].default
    temperature: Annotated[list[Temperature], Field(min_length=1, max_length=MAX_TEMPERATURES)] = \
        Field(default_factory=lambda: list(DEFAULT_TEMPERATURES))
    compression_ratio_threshold: Ratio | None = _QUALITY["compression_ratio"].default
    log_prob_threshold: LogProb | None = _QUALITY["log_prob"].default
    no_speech_threshold: Probability | None = _QUALITY["no_speech"].default
    unsure_language_threshold: Probability | None = _QUALITY["unsure_language"].default
    initial_prompt: PromptText | None = Field(default=None, validation_alias=AliasChoices("initial_prompt", "prompt"))
    hotwords: PromptText | None = None
    word_timestamps: bool = False
    include_tokens: bool = False  # each segment's token ids in the result (OpenAI's verbose_json has them)
    without_timestamps: bool = False
    max_new_tokens: NewTokens = _DECODE["max_new_tokens"].default
    repetition_penalty: RepetitionPenalty = _DECODE["repetition_penalty"].default
    length_penalty: LengthPenalty = _DECODE["length_penalty"].default  # beam search: score / length ** this
    language_detection: Literal["file", "chunk"] = "file"  # "chunk": detect per window
    vad_threshold: VadThreshold = _VAD["threshold"].default
    vad_min_silence_ms: Milliseconds = _VAD["min_silence_ms"].default
    vad_speech_pad_ms: PadMilliseconds = _VAD["speech_pad_ms"].default
    vad_end_pad_ms: PadMilliseconds = _VAD["end_pad_ms"].default
    # speaker diarization (speakers/): off unless asked for; the count given, or estimated within min..max
    diarize: bool = False
    num_speakers: SpeakerCount | None = None
    min_speakers: SpeakerCount = 1
    max_speakers: SpeakerCount = DEFAULT_MAX_SPEAKERS
    # names of the known speakers, one per reference clip (the clips travel beside the audio)
    known_speaker_names: Annotated[list[SpeakerName], Field(max_length=MAX_KNOWN_SPEAKERS)] = \
        Field(default_factory=list)

    @field_validator("known_speaker_names", mode="before")
    @classmethod
    def _names_list(cls, value: Any) -> Any:
        """A list, or "agent,customer" (query strings and custom attributes)."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _speaker_options(self) -> "TranscribeOptions":
        """Speaker options only with diarize=true, and a count range that holds together."""
        given = [name for name in ("num_speakers", "min_speakers", "max_speakers", "known_speaker_names")
                 if name in self.model_fields_set]
        if given and not self.diarize:
            raise _OptionError(given[0], f"{given[0]} is an option of speaker diarization: add diarize=true.")
        if self.min_speakers > self.max_speakers:
            raise _OptionError("min_speakers", f"min_speakers ({self.min_speakers}) is above max_speakers "
                               f"({self.max_speakers}).")
        bounded = {"min_speakers", "max_speakers"} & self.model_fields_set
        if self.num_speakers is not None and bounded and not self.min_speakers <= self.num_speakers <= self.max_speakers:
            name = "num_speakers"
            raise _OptionError(name, f"num_speakers ({self.num_speakers}) is outside min_speakers..max_speakers "
                               f"({self.min_speakers}..{self.max_speakers}); give one or the other.")
        if len(set(self.known_speaker_names)) < len(self.known_speaker_names):
            raise _OptionError("known_speaker_names", "known_speaker_names has a name twice: name each speaker once.")
        return self

    @model_validator(mode="after")
    def _bounded_decodes(self) -> "TranscribeOptions":
        """Every window may be decoded once per temperature, each with beam_size beams: cap the product."""
        decodes = len(self.temperature) * self.beam_size
        if decodes > MAX_WINDOW_DECODES:
            name = "temperature" if "temperature" in self.model_fields_set else "beam_size"
            raise _OptionError(name, f"{len(self.temperature)} temperatures x beam_size {self.beam_size} = {decodes} "
                               f"decodes per window, above the limit of {MAX_WINDOW_DECODES}: give fewer "
                               "temperatures or a smaller beam_size.")
        return self

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature_list(cls, value: Any) -> Any:
        """A number, a list, or "0,0.2,0.4" (query strings) all mean the fallback order."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()] or value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value]
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info) -> Any:
        """`true` is not a number: pydantic would read it as 1."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and "bool" not in str(annotation):
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("model")
    @classmethod
    def _model_id(cls, value: str | None) -> str | None:
        from .models import is_model_id

        if value is not None and not is_model_id(value):
            raise ValueError("not a model id: 1-64 letters, digits, '.', '_' or '-' (GET /v1/models lists them)")
        return value

    @field_validator("language", mode="before")
    @classmethod
    def _language_code(cls, value: Any) -> Any:
        return value.strip().lower() or None if isinstance(value, str) else value

    # ---- the groups, as the code that applies them takes them ----------------------------------
    @property
    def vad_options(self) -> VadOptions:
        return VadOptions(threshold=self.vad_threshold, min_silence_ms=self.vad_min_silence_ms,
                          speech_pad_ms=self.vad_speech_pad_ms, end_pad_ms=self.vad_end_pad_ms)

    @property
    def thresholds(self) -> QualityThresholds:
        return QualityThresholds(compression_ratio=self.compression_ratio_threshold, log_prob=self.log_prob_threshold,
                                 no_speech=self.no_speech_threshold, unsure_language=self.unsure_language_threshold)

    def decode_options(self, temperature: float) -> DecodeOptions:
        """The engine options of one attempt: every DecodeOptions field this request also has."""
        shared = {name: getattr(self, name) for name in _DECODE if name in type(self).model_fields}
        return DecodeOptions(**{**shared, "temperature": temperature})

    def temperatures(self) -> list[float]:
        return list(self.temperature)

    def wire(self) -> dict:
        """What the caller set, and only that, for the next hop (the other side applies the defaults)."""
        return self.model_dump(exclude_unset=True)


OPTION_NAMES = tuple(sorted(TranscribeOptions.model_fields)) + ("prompt",)


def parse_options(raw: dict | None) -> TranscribeOptions:
    """Options from any source (dict of JSON values or strings), or a 400 naming the first bad one."""
    return validated(TranscribeOptions, raw or {})


def validated(model: type[BaseModel], raw: dict) -> Any:
    """`model(**raw)`, with pydantic's first error turned into a 400 that names the option."""
    if not isinstance(raw, dict):
        raise invalid_parameter("options", "Options must be a JSON object of name: value.")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _first_error(exc, model) from None


class _OptionError(ValueError):
    """A rule between options (a model validator): names the option it is about."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


def _first_error(exc: ValidationError, model: type[BaseModel]) -> WhisperTritonError:
    error = exc.errors(include_url=False)[0]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _OptionError):
        return invalid_parameter(cause.param, cause.message)
    location = error.get("loc") or ("options",)
    param = shown_name(str(location[0])) or "options"  # the caller chose the name: never echo it at any length
    if error.get("type") == "extra_forbidden":
        known = ", ".join(sorted(set(model.model_fields) | ({"prompt"} if model is TranscribeOptions else set())))
        return invalid_parameter(param, f"Unknown option {param!r}. Known options: {known}.")
    value = error.get("input")
    shown = _shown_value(value)
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return invalid_parameter(param, f"Invalid {param}: {message} (got {shown}).")


def _shown_value(value: Any) -> str:
    """A bad value as an error message repeats it: short ones whole, long ones by their size."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a string of {len(value)} characters"
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__} value"
