"""What the settings routes answer."""

from __future__ import annotations

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr

from .base import Answer

SettingValue = StrictInt | StrictFloat | StrictStr | StrictBool


class SettingInfo(Answer):
    value: SettingValue
    default: SettingValue
    type: str = Field(description="the value's type: str, int, float or bool")
    expected: str = Field(description="what a valid value looks like")
    description: str


class Setting(SettingInfo):
    key: str


class Settings(Answer):
    settings: dict[str, SettingInfo] = Field(description="every setting, by key")
