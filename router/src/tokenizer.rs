//! The toy model's byte-level tokenizer: printable ASCII, newline and tab map to the first 97
//! token ids and back. Anything else is refused with the offending character.

const PRINTABLE: std::ops::RangeInclusive<u8> = b' '..=b'~';

pub fn encode(text: &str, vocab: usize) -> Result<Vec<u32>, String> {
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            let id = match c {
                ' '..='~' => c as u32 - ' ' as u32,
                '\n' => 95,
                '\t' => 96,
                other => return Err(format!("character {other:?} at {i} is outside the toy tokenizer's alphabet (printable ASCII, newline, tab)")),
            };
            if id as usize >= vocab {
                return Err(format!("character {c:?} at {i} maps to token {id}, outside the vocabulary of {vocab}"));
            }
            Ok(id)
        })
        .collect()
}

/// Token ids the alphabet does not cover decode as `�`.
pub fn decode(ids: &[u32]) -> String {
    ids.iter()
        .map(|&id| match id {
            0..=94 => (*PRINTABLE.start() + id as u8) as char,
            95 => '\n',
            96 => '\t',
            _ => '\u{FFFD}',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_ascii() {
        let text = "Hello, fleet!\n\tok ~";
        assert_eq!(decode(&encode(text, 100).unwrap()), text);
        assert_eq!(encode(" !", 100).unwrap(), vec![0, 1]);
    }

    #[test]
    fn refuses_what_it_cannot_map() {
        assert!(encode("héllo", 100).unwrap_err().contains("'é' at 1"));
        assert!(encode("~", 50)
            .unwrap_err()
            .contains("outside the vocabulary of 50"));
        assert_eq!(decode(&[97, 0]), "\u{FFFD} ");
    }
}
