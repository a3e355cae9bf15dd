//! Conversation templates (LLaVA-JP's `conversation.py`): `plain` for stage 1, `v1` (Japanese
//! system text, `ユーザー` / `システム`) for stage 2, and upstream LLaVA's English `vicuna_v1`.
//! A new template is one more [`Template`] value in [`Template::by_name`].

/// How turns are joined (`SeparatorStyle` in the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeparatorStyle {
    /// `system + sep`, then `role + ": " + message` followed by `sep` after a user turn and
    /// `sep2` after an answer; an open slot is `role + ": "`.
    Two,
    /// Messages concatenated, each followed by `sep`; no system text, no roles.
    Plain,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: &'static str,
    pub system: &'static str,
    /// (user, assistant)
    pub roles: [&'static str; 2],
    pub style: SeparatorStyle,
    pub sep: &'static str,
    pub sep2: &'static str,
}

pub const V1_JA_SYSTEM: &str =
    "これは好奇心旺盛なユーザーと人工知能システムのチャットです。システムはユーザーの質問に親切、詳細、丁寧に答える。";

impl Template {
    /// LLaVA-JP's `v1` (`conv_vicuna_v1` there), with llm-jp's end-of-document separator.
    pub fn v1() -> Self {
        Self {
            name: "v1",
            system: V1_JA_SYSTEM,
            roles: ["ユーザー", "システム"],
            style: SeparatorStyle::Two,
            sep: " ",
            sep2: "<EOD|LLM-jp>",
        }
    }

    /// Stage 1: `<image>` + caption + `\n`.
    pub fn plain() -> Self {
        Self { name: "plain", system: "", roles: ["", ""], style: SeparatorStyle::Plain, sep: "\n", sep2: "" }
    }

    /// Upstream LLaVA's English `vicuna_v1`, for English LLaVA data.
    pub fn vicuna_v1() -> Self {
        Self {
            name: "vicuna_v1",
            system: "A chat between a curious user and an artificial intelligence assistant. \
                     The assistant gives helpful, detailed, and polite answers to the user's questions.",
            roles: ["USER", "ASSISTANT"],
            style: SeparatorStyle::Two,
            sep: " ",
            sep2: "</s>",
        }
    }

    pub fn by_name(name: &str) -> Result<Self, String> {
        match name {
            "v1" => Ok(Self::v1()),
            "plain" => Ok(Self::plain()),
            "vicuna_v1" | "v1_en" => Ok(Self::vicuna_v1()),
            _ => Err(format!("unknown conversation template `{name}`: expected v1, plain or vicuna_v1")),
        }
    }

    /// The prompt text for `messages` (role index 0 = user, 1 = assistant; `None` = the open
    /// slot generation fills), as the reference's `get_prompt()` writes it.
    pub fn prompt(&self, messages: &[(usize, Option<&str>)]) -> String {
        match self.style {
            SeparatorStyle::Two => {
                let mut out = format!("{}{}", self.system, self.sep);
                for (i, (role, message)) in messages.iter().enumerate() {
                    match message {
                        Some(m) => {
                            out.push_str(self.roles[*role]);
                            out.push_str(": ");
                            out.push_str(m);
                            out.push_str(if i % 2 == 0 { self.sep } else { self.sep2 });
                        }
                        None => {
                            out.push_str(self.roles[*role]);
                            out.push_str(": ");
                        }
                    }
                }
                out
            }
            SeparatorStyle::Plain => {
                let mut out = self.system.to_string();
                for (i, (_, message)) in messages.iter().enumerate() {
                    if let Some(m) = message {
                        out.push_str(m);
                        out.push_str(if i % 2 == 0 { self.sep } else { self.sep2 });
                    }
                }
                out
            }
        }
    }

    /// Which side a data file's `from` names: `ユーザー`/`human`/`user` is 0,
    /// `システム`/`gpt`/`assistant` is 1.
    pub fn role_index(from: &str) -> Option<usize> {
        match from {
            "ユーザー" | "human" | "user" | "USER" => Some(0),
            "システム" | "gpt" | "assistant" | "ASSISTANT" => Some(1),
            _ => None,
        }
    }
}
