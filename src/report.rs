//! Plots and tables for results.
//!
//! Charts are written as both PNG and SVG with plotters. Text is drawn with DejaVu Sans, which is
//! embedded in the binary and registered with plotters on first use, so no system fonts are
//! needed at run time. Tables render as GitHub Markdown, CSV and aligned plain text. Every file is
//! written atomically (temporary file, fsync, rename).

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// DejaVu Sans (see `assets/fonts/LICENSE-DejaVu.txt`), registered as plotters' `sans-serif`.
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
/// The font family name every piece of text is drawn with.
const FONT: &str = "sans-serif";

/// Size of a [`line_chart`] image in pixels.
const LINE_SIZE: (u32, u32) = (900, 600);
/// Size of a [`panels_chart`] image in pixels.
const PANELS_SIZE: (u32, u32) = (1500, 450);
/// Above this many points a series is drawn as a plain line, without markers.
const MAX_MARKERS: usize = 500;
/// Above this many points a line is thinned (keeping each bucket's min and max) before drawing.
const MAX_LINE_POINTS: usize = 4000;
/// Longest title, axis label or legend entry drawn; longer text is cut with an ellipsis.
const MAX_LABEL_CHARS: usize = 60;

/// One named series of (x, y) points, optionally with a vertical error bar (lo, hi) per point.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// Legend entry; an empty name leaves the series out of the legend.
    pub name: String,
    /// The points in drawing order. Points with a NaN or infinite coordinate are skipped and
    /// break the line.
    pub points: Vec<(f64, f64)>,
    /// Per-point error bar as absolute (lo, hi) y values, matched to `points` by index.
    pub errors: Option<Vec<(f64, f64)>>,
}

/// Registers the embedded font once; returns whether it is usable.
fn ensure_font() -> Result<()> {
    static ONCE: Once = Once::new();
    static OK: AtomicBool = AtomicBool::new(false);
    ONCE.call_once(|| {
        let ok = register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok();
        OK.store(ok, Ordering::SeqCst);
    });
    if !OK.load(Ordering::SeqCst) {
        bail!("the embedded DejaVu Sans font could not be registered with plotters");
    }
    Ok(())
}

/// Draws a line chart with markers (and error bars when present) to `{stem}.png` and
/// `{stem}.svg`; returns both paths.
///
/// The image is 900x600 pixels. Each series gets its own colour and a legend entry.
pub fn line_chart(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<Vec<PathBuf>> {
    xy_chart(stem, title, x_label, y_label, series, true)
}

/// Like [`line_chart`], but each series is drawn as markers only (no connecting lines, markers
/// at any number of points): a scatter plot.
pub fn scatter_chart(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<Vec<PathBuf>> {
    xy_chart(stem, title, x_label, y_label, series, false)
}

/// The line and scatter charts: markers, joined by lines when `lines` is set.
fn xy_chart(stem: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series], lines: bool) -> Result<Vec<PathBuf>> {
    ensure_font()?;
    let sizes = TextSizes { title: 24, axis_desc: 16, tick: 13, legend: 14, ticks: 8 };
    let job = LineJob { title, x_label, y_label, series, sizes: &sizes, lines };
    render_both(stem, LINE_SIZE, &job)
}

/// Three-panel figure (side by side) for the classification views: each panel is
/// `(title, x label, y label, series)`, with series over feature rank or index.
///
/// Series may be long (tens of thousands of points); series with more than 500 points are drawn
/// as lines without markers. Any number of panels works, though the layout is sized for three.
/// Writes `{stem}.png` (1500x450) and `{stem}.svg`; returns both paths.
pub fn panels_chart(
    stem: &Path,
    panels: &[(String, String, String, Vec<Series>)],
) -> Result<Vec<PathBuf>> {
    ensure_font()?;
    let sizes = TextSizes {
        title: 18,
        axis_desc: 14,
        tick: 11,
        legend: 12,
        ticks: 5,
    };
    let job = PanelsJob {
        panels,
        sizes: &sizes,
    };
    render_both(stem, PANELS_SIZE, &job)
}

/// Font sizes (in pixels) for one chart.
struct TextSizes {
    title: u32,
    axis_desc: u32,
    tick: u32,
    legend: u32,
    /// About how many tick labels per axis.
    ticks: usize,
}

/// Appends `ext` (e.g. ".png") to `stem` without touching any dot already in its file name.
fn with_suffix(stem: &Path, ext: &str) -> PathBuf {
    let mut name = OsString::from(stem.as_os_str());
    name.push(ext);
    PathBuf::from(name)
}

/// Something that can draw itself on any plotters backend (so one drawing serves PNG and SVG).
trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;
}

/// The single chart of [`line_chart`].
struct LineJob<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    series: &'a [Series],
    sizes: &'a TextSizes,
    /// Connect the points (false: markers only).
    lines: bool,
}

impl Figure for LineJob<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        draw_chart(
            root,
            self.title,
            self.x_label,
            self.y_label,
            self.series,
            self.sizes,
            self.lines,
        )
    }
}

/// The side-by-side charts of [`panels_chart`].
struct PanelsJob<'a> {
    panels: &'a [(String, String, String, Vec<Series>)],
    sizes: &'a TextSizes,
}

impl Figure for PanelsJob<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        if self.panels.is_empty() {
            return Ok(());
        }
        let areas = root.split_evenly((1, self.panels.len()));
        for (area, (title, x_label, y_label, series)) in areas.iter().zip(self.panels) {
            draw_chart(area, title, x_label, y_label, series, self.sizes, true)?;
        }
        Ok(())
    }
}

/// Draws `figure` to `{stem}.png` and `{stem}.svg`, each written atomically.
fn render_both(stem: &Path, size: (u32, u32), figure: &impl Figure) -> Result<Vec<PathBuf>> {
    create_parent(stem)?;
    let png_path = with_suffix(stem, ".png");
    let svg_path = with_suffix(stem, ".svg");

    replace_atomic(&png_path, |tmp| {
        let root = BitMapBackend::new(tmp, size).into_drawing_area();
        root.fill(&WHITE)?;
        figure.draw(&root)?;
        root.present()?;
        Ok(())
    })?;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        figure.draw(&root)?;
        root.present()?;
    }
    write_atomic(&svg_path, svg.as_bytes())?;

    Ok(vec![png_path, svg_path])
}

/// A series split into drawable pieces: finite runs of points, and its valid error bars.
struct Prepared<'a> {
    name: &'a str,
    /// Runs of consecutive finite points; a non-finite point ends a run.
    segments: Vec<Vec<(f64, f64)>>,
    /// (x, lo, y, hi) for every finite point whose error bar is finite too.
    errors: Vec<(f64, f64, f64, f64)>,
    /// How many finite points there are in all.
    finite: usize,
}

fn prepare(series: &Series) -> Prepared<'_> {
    let mut segments = Vec::new();
    let mut run = Vec::new();
    let mut errors = Vec::new();
    let mut finite = 0;
    for (i, &(x, y)) in series.points.iter().enumerate() {
        if !(x.is_finite() && y.is_finite()) {
            if !run.is_empty() {
                segments.push(std::mem::take(&mut run));
            }
            continue;
        }
        finite += 1;
        run.push((x, y));
        if let Some(&(lo, hi)) = series.errors.as_ref().and_then(|e| e.get(i)) {
            if lo.is_finite() && hi.is_finite() {
                errors.push((x, lo.min(hi), y, lo.max(hi)));
            }
        }
    }
    if !run.is_empty() {
        segments.push(run);
    }
    Prepared {
        name: &series.name,
        segments,
        errors,
        finite,
    }
}

/// The data extent over all prepared series, padded so that it is never empty.
fn axis_ranges(prepared: &[Prepared]) -> ((f64, f64), (f64, f64)) {
    let mut xs = (f64::INFINITY, f64::NEG_INFINITY);
    let mut ys = (f64::INFINITY, f64::NEG_INFINITY);
    let widen = |r: &mut (f64, f64), v: f64| {
        r.0 = r.0.min(v);
        r.1 = r.1.max(v);
    };
    for p in prepared {
        for &(x, y) in p.segments.iter().flatten() {
            widen(&mut xs, x);
            widen(&mut ys, y);
        }
        for &(_, lo, _, hi) in &p.errors {
            widen(&mut ys, lo);
            widen(&mut ys, hi);
        }
    }
    (pad_range(xs, 0.02), pad_range(ys, 0.05))
}

/// Adds a margin of `frac` of the span on each side; pads a single value (or an empty range)
/// so plotters always gets a proper, finite range.
fn pad_range((lo, hi): (f64, f64), frac: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let scale = lo.abs().max(hi.abs());
    let padded = if span <= scale * 1e-9 || span == 0.0 {
        let pad = if scale > 0.0 { scale * 0.1 } else { 1.0 };
        (lo - pad, hi + pad)
    } else {
        (lo - span * frac, hi + span * frac)
    };
    if padded.0.is_finite() && padded.1.is_finite() && padded.0 < padded.1 {
        padded
    } else if lo < hi {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

/// Reduces a long run of points to the minimum and maximum of each of `max / 2` buckets (in
/// their original order), which keeps the drawn shape while keeping files small.
fn thin(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points.to_vec();
    }
    let buckets = (max / 2).max(1);
    let chunk = points.len().div_ceil(buckets);
    let mut out = Vec::with_capacity(buckets * 2);
    for part in points.chunks(chunk) {
        let (mut lo, mut hi) = (0, 0);
        for (i, p) in part.iter().enumerate() {
            if p.1 < part[lo].1 {
                lo = i;
            }
            if p.1 > part[hi].1 {
                hi = i;
            }
        }
        out.push(part[lo.min(hi)]);
        if lo != hi {
            out.push(part[lo.max(hi)]);
        }
    }
    out
}

/// Colour of the `i`-th series: the Tableau 10 palette, then plotters' 99-colour palette.
fn series_color(i: usize) -> RGBColor {
    const TABLEAU: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    match TABLEAU.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b),
        None => {
            let c = Palette99::pick(i - TABLEAU.len()).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

/// Cuts `text` to at most `max` characters, ending with an ellipsis when cut; flattens newlines.
fn shorten(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Draws one titled chart with axes, lines (unless `lines` is false), markers, error bars and a
/// legend into `area`.
fn draw_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    sizes: &TextSizes,
    lines: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let prepared: Vec<Prepared> = series.iter().map(prepare).collect();
    let ((x0, x1), (y0, y1)) = axis_ranges(&prepared);

    let mut chart = ChartBuilder::on(area)
        .caption(shorten(title, MAX_LABEL_CHARS), (FONT, sizes.title))
        .margin(12)
        .x_label_area_size(sizes.tick * 2 + sizes.axis_desc * 2)
        .y_label_area_size(sizes.tick * 4 + sizes.axis_desc * 2)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(shorten(x_label, MAX_LABEL_CHARS))
        .y_desc(shorten(y_label, MAX_LABEL_CHARS))
        .label_style((FONT, sizes.tick))
        .axis_desc_style((FONT, sizes.axis_desc))
        .light_line_style(RGBColor(238, 238, 238))
        .x_labels(sizes.ticks)
        .y_labels(sizes.ticks)
        .draw()?;

    let mut any_named = false;
    for (i, p) in prepared.iter().enumerate() {
        let color = series_color(i);
        let markers = !lines || p.finite <= MAX_MARKERS;
        // An empty element series carries the legend entry, so every named series is listed,
        // even one without drawable points.
        if !p.name.is_empty() {
            any_named = true;
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
                .label(shorten(p.name, MAX_LABEL_CHARS))
                .legend(move |(x, y)| {
                    let width = if markers { 2 } else { 1 };
                    let line =
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width));
                    let dot = Circle::new((x + 10, y), if markers { 3 } else { 0 }, color.filled());
                    EmptyElement::at((0, 0)) + line + dot
                });
        }
        for segment in p.segments.iter().filter(|_| lines) {
            let points = thin(segment, MAX_LINE_POINTS);
            // Thick polylines get miter spikes at sharp turns, so dense lines are drawn 1 px wide.
            let width = if markers { 2 } else { 1 };
            chart.draw_series(LineSeries::new(points, color.stroke_width(width)))?;
        }
        if markers {
            let points = p.segments.iter().flatten();
            chart.draw_series(points.map(|&xy| Circle::new(xy, 3, color.filled())))?;
        }
        // Error bars: a vertical line from lo to hi with short caps (plotters' ErrorBar needs a
        // feature this crate does not enable).
        let cap = (x1 - x0) * 0.005;
        chart.draw_series(p.errors.iter().flat_map(|&(x, lo, _y, hi)| {
            [
                vec![(x, lo), (x, hi)],
                vec![(x - cap, lo), (x + cap, lo)],
                vec![(x - cap, hi), (x + cap, hi)],
            ]
            .map(|path| PathElement::new(path, color.stroke_width(1)))
        }))?;
    }

    if any_named {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font((FONT, sizes.legend))
            .draw()?;
    }
    Ok(())
}

/// A table as GitHub Markdown, as CSV (RFC 4180 quoting), and as aligned plain text for the
/// terminal. Rows shorter than the widest row are padded with empty cells.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    /// Column titles.
    pub headers: Vec<String>,
    /// Body rows, one cell per column.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Number of columns: the widest of the header and the rows.
    fn columns(&self) -> usize {
        self.rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0)
    }

    /// The header and every row, each padded to `columns()` cells.
    fn grid(&self) -> Vec<Vec<&str>> {
        let n = self.columns();
        std::iter::once(&self.headers)
            .chain(&self.rows)
            .map(|row| {
                (0..n)
                    .map(|i| row.get(i).map_or("", String::as_str))
                    .collect()
            })
            .collect()
    }

    /// Whether every non-empty body cell of column `col` is a number (such columns align right).
    fn numeric(&self, col: usize) -> bool {
        let mut cells = self
            .rows
            .iter()
            .filter_map(|r| r.get(col))
            .map(|c| c.trim())
            .filter(|c| !c.is_empty())
            .peekable();
        cells.peek().is_some() && cells.all(|c| c.parse::<f64>().is_ok())
    }

    /// An HTML table (escaped); numeric columns are right-aligned.
    pub fn to_html(&self) -> String {
        let n = self.columns();
        let mut out = String::from("<table>\n<tr>");
        for h in &self.headers {
            out += &format!("<th>{}</th>", escape_html(h));
        }
        out += "</tr>\n";
        let right: Vec<bool> = (0..n).map(|i| self.numeric(i)).collect();
        for row in &self.rows {
            out += "<tr>";
            for (i, c) in row.iter().enumerate() {
                let class = if right.get(i) == Some(&true) { " class=\"num\"" } else { "" };
                out += &format!("<td{class}>{}</td>", escape_html(c));
            }
            out += "</tr>\n";
        }
        out + "</table>\n"
    }

    /// Renders `cells` (already escaped) with columns padded to a shared width.
    fn aligned(&self, cells: &[Vec<String>]) -> (Vec<usize>, Vec<bool>) {
        let n = self.columns();
        let widths = (0..n)
            .map(|i| {
                cells
                    .iter()
                    .map(|r| r[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let right = (0..n).map(|i| self.numeric(i)).collect();
        (widths, right)
    }

    /// GitHub-flavoured Markdown; `|` is escaped and newlines become `<br>`. Numeric columns are
    /// right-aligned.
    pub fn to_markdown(&self) -> String {
        if self.columns() == 0 {
            return String::new();
        }
        let cells: Vec<Vec<String>> = self
            .grid()
            .iter()
            .map(|row| {
                row.iter()
                    .map(|c| {
                        c.replace('|', "\\|")
                            .replace("\r\n", "<br>")
                            .replace(['\n', '\r'], "<br>")
                    })
                    .collect()
            })
            .collect();
        let (mut widths, right) = self.aligned(&cells);
        for w in &mut widths {
            *w = (*w).max(3);
        }
        let line = |row: &[String]| {
            let padded: Vec<String> = row
                .iter()
                .zip(&widths)
                .zip(&right)
                .map(|((c, &w), &r)| pad(c, w, r))
                .collect();
            format!("| {} |\n", padded.join(" | "))
        };
        let mut out = line(&cells[0]);
        let rule: Vec<String> = widths
            .iter()
            .zip(&right)
            .map(|(&w, &r)| {
                if r {
                    format!("{}:", "-".repeat(w - 1))
                } else {
                    "-".repeat(w)
                }
            })
            .collect();
        out.push_str(&format!("| {} |\n", rule.join(" | ")));
        for row in &cells[1..] {
            out.push_str(&line(row));
        }
        out
    }

    /// CSV per RFC 4180: fields holding a comma, quote, CR or LF are quoted, quotes are doubled,
    /// and records end with CRLF.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        if self.columns() == 0 {
            return out;
        }
        for row in self.grid() {
            let fields: Vec<String> = row.iter().map(|c| csv_field(c)).collect();
            out.push_str(&fields.join(","));
            out.push_str("\r\n");
        }
        out
    }

    /// Plain text with columns aligned by two spaces and a dashed rule under the header; numeric
    /// columns are right-aligned and newlines inside cells become spaces.
    pub fn to_text(&self) -> String {
        if self.columns() == 0 {
            return String::new();
        }
        let cells: Vec<Vec<String>> = self
            .grid()
            .iter()
            .map(|row| {
                row.iter()
                    .map(|c| c.replace(|ch: char| ch.is_control(), " "))
                    .collect()
            })
            .collect();
        let (widths, right) = self.aligned(&cells);
        let line = |row: &[String]| {
            let padded: Vec<String> = row
                .iter()
                .zip(&widths)
                .zip(&right)
                .map(|((c, &w), &r)| pad(c, w, r))
                .collect();
            format!("{}\n", padded.join("  ").trim_end())
        };
        let mut out = line(&cells[0]);
        let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
        out.push_str(&format!("{}\n", rule.join("  ")));
        for row in &cells[1..] {
            out.push_str(&line(row));
        }
        out
    }
}

/// Pads `text` with spaces to `width` characters, on the left when `right` is set.
fn pad(text: &str, width: usize, right: bool) -> String {
    let fill = " ".repeat(width.saturating_sub(text.chars().count()));
    if right {
        format!("{fill}{text}")
    } else {
        format!("{text}{fill}")
    }
}

/// One CSV field, quoted when it holds a comma, quote, CR or LF.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// A lock on an output path: the file `{path}.lock` holding our process id, removed on drop.
/// A second process asking for the same output gets a clear error; a lock left by a process
/// that no longer runs is taken over.
pub struct OutputLock(PathBuf);

impl OutputLock {
    pub fn acquire(path: &Path) -> Result<Self> {
        let lock = with_suffix(path, ".lock");
        create_parent(&lock)?;
        for _ in 0..2 {
            match fs::OpenOptions::new().write(true).create_new(true).open(&lock) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).with_context(|| format!("{}: cannot write", lock.display()))?;
                    return Ok(Self(lock));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = fs::read_to_string(&lock).unwrap_or_default();
                    let pid = pid.trim();
                    let alive = !pid.is_empty() && Path::new("/proc").join(pid).exists();
                    if alive {
                        anyhow::bail!(
                            "{}: another neurosteer process (pid {pid}) is writing it; wait for it, or delete {} if it is gone",
                            path.display(),
                            lock.display()
                        );
                    }
                    fs::remove_file(&lock).with_context(|| format!("{}: cannot remove a stale lock", lock.display()))?;
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("{}: cannot create the lock file", lock.display()))),
            }
        }
        anyhow::bail!("{}: cannot take the lock {}", path.display(), lock.display())
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Escapes text for HTML.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A self-contained HTML page, built section by section: no scripts, no external files (SVG
/// figures are inlined), readable offline.
pub struct Html {
    title: String,
    body: String,
}

impl Html {
    pub fn new(title: &str) -> Self {
        Self { title: title.to_string(), body: format!("<h1>{}</h1>\n", escape_html(title)) }
    }

    pub fn h2(&mut self, text: &str) {
        self.body += &format!("<h2>{}</h2>\n", escape_html(text));
    }

    pub fn p(&mut self, text: &str) {
        self.body += &format!("<p>{}</p>\n", escape_html(text));
    }

    /// A highlighted caution.
    pub fn warning(&mut self, text: &str) {
        self.body += &format!("<p class=\"warn\">{}</p>\n", escape_html(text));
    }

    /// A two-column list of names and values.
    pub fn pairs(&mut self, pairs: &[(String, String)]) {
        self.body += "<table class=\"pairs\">\n";
        for (k, v) in pairs {
            self.body += &format!("<tr><th>{}</th><td>{}</td></tr>\n", escape_html(k), escape_html(v));
        }
        self.body += "</table>\n";
    }

    pub fn table(&mut self, t: &Table) {
        self.body += &t.to_html();
    }

    /// Inlines the SVG file at `svg` (written by the charts here) with a caption.
    pub fn figure(&mut self, svg: &Path, caption: &str) -> Result<()> {
        let text = fs::read_to_string(svg).with_context(|| format!("{}: cannot read", svg.display()))?;
        let start = text.find("<svg").with_context(|| format!("{}: not an SVG file", svg.display()))?;
        self.body += &format!("<figure>{}<figcaption>{}</figcaption></figure>\n", &text[start..], escape_html(caption));
        Ok(())
    }

    /// A prompt and several texts side by side (e.g. generations under two configurations).
    pub fn side_by_side(&mut self, title: &str, prompt: &str, texts: &[(&str, &str)]) {
        self.body += &format!("<div class=\"example\"><h3>{}</h3><pre class=\"prompt\">{}</pre><div class=\"cols\">", escape_html(title), escape_html(prompt));
        for (name, text) in texts {
            self.body += &format!("<div><h4>{}</h4><pre>{}</pre></div>", escape_html(name), escape_html(text));
        }
        self.body += "</div></div>\n";
    }

    /// The finished page.
    pub fn finish(self) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{}</style></head><body>\n{}</body></html>\n",
            escape_html(&self.title),
            HTML_STYLE,
            self.body
        )
    }
}

const HTML_STYLE: &str = "body{font-family:sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:0.5em 0;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left}\
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}.pairs th{width:14em}\
.warn{background:#fff3cd;border-left:4px solid #e0a800;padding:0.4em 0.8em}\
figure{margin:1em 0}figure svg{max-width:100%;height:auto}figcaption{font-size:0.85em;color:#555}\
pre{white-space:pre-wrap;background:#f8f8f8;padding:0.5em;margin:0.3em 0}\
.cols{display:flex;gap:1em}.cols>div{flex:1}.example{border-top:1px solid #ddd;margin-top:1em}";

/// Creates the folder `path` goes in (and its parents), when it names one.
pub fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the folder", dir.display()))?;
    }
    Ok(())
}

/// Writes a file atomically: to a temporary file in the same folder (see `tmp_path`), fsync, then
/// rename.
///
/// Readers see either the old file or the complete new one, never a partial write. The
/// temporary file is removed if anything fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_atomic(path, |tmp| Ok(fs::write(tmp, bytes)?))
}

/// [`write_atomic`] for a writer that takes a path: `write` fills the temporary file, which then
/// replaces the file at `path` (for a symbolic link, the file it points to, and the link stays).
/// A folder, a device or a pipe at `path` is refused, not replaced.
pub fn replace_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let path = &regular_target(path, 0)?;
    let tmp = tmp_path(path);
    // A stale one (a link, say) is not written through.
    let _ = fs::remove_file(&tmp);
    if let Err(err) = write(&tmp).and_then(|()| commit_tmp(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(err.context(format!("writing {}", path.display())));
    }
    Ok(())
}

/// The temporary file an output at `path` is written to first: beside it, named for this process
/// (two writers of one output do not share it), its extension last (the PNG encoder picks its
/// format from it): `out.tmp-PID.json`.
fn tmp_path(path: &Path) -> PathBuf {
    let tag = format!(".tmp-{}", std::process::id());
    match (path.file_stem(), path.extension()) {
        (Some(stem), Some(ext)) => {
            let mut name = stem.to_os_string();
            name.push(format!("{tag}."));
            name.push(ext);
            path.with_file_name(name)
        }
        _ => with_suffix(path, &tag),
    }
}

/// The file an output at `path` replaces: `path` itself when it is a regular file or does not
/// exist yet, the end of the chain of symbolic links when it is one.
fn regular_target(path: &Path, links: usize) -> Result<PathBuf> {
    let Ok(meta) = fs::symlink_metadata(path) else { return Ok(path.to_path_buf()) };
    if meta.file_type().is_symlink() {
        if links >= 40 {
            bail!("{}: too many levels of symbolic links", path.display());
        }
        let target = fs::read_link(path).with_context(|| format!("{}: cannot read the symbolic link", path.display()))?;
        return regular_target(&path.parent().unwrap_or(Path::new("")).join(target), links + 1);
    }
    if !meta.is_file() {
        bail!("{}: exists and is not a regular file (a folder, device or pipe): not replacing it with an output", path.display());
    }
    Ok(path.to_path_buf())
}

/// Flushes the finished temporary file `tmp` to disk and renames it to `path`, then (on Unix)
/// syncs the folder so the rename itself is durable.
fn commit_tmp(tmp: &Path, path: &Path) -> Result<()> {
    fs::File::open(tmp)?.sync_all()?;
    fs::rename(tmp, path)?;
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A fresh, empty folder under the system temp dir.
    fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!(
            "neurosteer-report-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Checks the PNG magic and returns the IHDR width and height.
    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = fs::read(path).unwrap();
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "not a PNG: {}",
            path.display()
        );
        assert_eq!(&bytes[12..16], b"IHDR");
        let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        (width, height)
    }

    fn series(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.to_string(),
            points,
            errors: None,
        }
    }

    fn no_tmp_files(dir: &Path) {
        for entry in fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp"), "left a temporary file: {name}");
        }
    }

    #[test]
    fn line_chart_writes_png_and_svg() {
        let dir = temp_dir("line");
        let stem = dir.join("steering");
        let a = Series {
            name: "baseline".into(),
            points: (0..10).map(|i| (i as f64, (i as f64).sqrt())).collect(),
            errors: Some(
                (0..10)
                    .map(|i| ((i as f64).sqrt() - 0.3, (i as f64).sqrt() + 0.3))
                    .collect(),
            ),
        };
        let b = series(
            "steered",
            (0..10).map(|i| (i as f64, 0.2 * i as f64)).collect(),
        );
        let paths = line_chart(
            &stem,
            "Accuracy vs strength",
            "strength",
            "accuracy",
            &[a, b],
        )
        .unwrap();
        assert_eq!(
            paths,
            vec![dir.join("steering.png"), dir.join("steering.svg")]
        );
        assert_eq!(png_size(&paths[0]), LINE_SIZE);
        let svg = fs::read_to_string(&paths[1]).unwrap();
        for text in [
            "Accuracy vs strength",
            "strength",
            "accuracy",
            "baseline",
            "steered",
        ] {
            assert!(svg.contains(text), "SVG lacks {text:?}");
        }
        no_tmp_files(&dir);
    }

    #[test]
    fn line_chart_edge_cases_do_not_panic() {
        let dir = temp_dir("edge");
        let long = "a very long series name that goes on and on and on, well past any sensible legend width";
        let cases: Vec<(&str, Vec<Series>)> = vec![
            ("none", vec![]),
            ("empty", vec![series("empty", vec![])]),
            ("single", vec![series("one", vec![(3.0, 7.0)])]),
            ("zero", vec![series("zero", vec![(0.0, 0.0), (0.0, 0.0)])]),
            (
                "flat",
                vec![series("flat", vec![(0.0, 2.0), (1.0, 2.0), (2.0, 2.0)])],
            ),
            (
                "nan",
                vec![series(
                    "nan",
                    vec![
                        (0.0, 1.0),
                        (1.0, f64::NAN),
                        (f64::NAN, 2.0),
                        (3.0, 4.0),
                        (4.0, f64::INFINITY),
                    ],
                )],
            ),
            (
                "all-nan",
                vec![series("all nan", vec![(f64::NAN, f64::NAN)])],
            ),
            ("long", vec![series(long, vec![(0.0, 1.0), (1.0, 2.0)])]),
            (
                "bad-errors",
                vec![Series {
                    name: "errs".into(),
                    points: vec![(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)],
                    errors: Some(vec![(1.5, 0.5), (f64::NAN, 2.5)]),
                }],
            ),
            (
                "many",
                (0..15)
                    .map(|i| {
                        series(
                            &format!("s{i}"),
                            vec![(0.0, i as f64), (1.0, i as f64 + 1.0)],
                        )
                    })
                    .collect(),
            ),
        ];
        for (tag, list) in cases {
            let paths = line_chart(&dir.join(tag), &format!("case {tag}"), "x", "y", &list)
                .unwrap_or_else(|e| panic!("{tag}: {e:#}"));
            assert_eq!(png_size(&paths[0]), LINE_SIZE, "{tag}");
            let svg = fs::read_to_string(&paths[1]).unwrap();
            assert!(svg.contains(&format!("case {tag}")), "{tag}");
        }
        no_tmp_files(&dir);
    }

    #[test]
    fn panels_chart_handles_many_points() {
        let dir = temp_dir("panels");
        let n = 65_536;
        let decay: Vec<(f64, f64)> = (0..n)
            .map(|i| (i as f64, (-(i as f64) / 5000.0).exp()))
            .collect();
        let noisy: Vec<(f64, f64)> = (0..n)
            .map(|i| (i as f64, ((i * 7919) % 1000) as f64 / 1000.0))
            .collect();
        let panels = vec![
            (
                "Activation by rank".to_string(),
                "feature rank".to_string(),
                "mean activation".to_string(),
                vec![series("reasoning", decay.clone()), series("control", noisy)],
            ),
            (
                "Score".to_string(),
                "feature index".to_string(),
                "score".to_string(),
                vec![series(
                    "score",
                    (0..50).map(|i| (i as f64, (i % 7) as f64)).collect(),
                )],
            ),
            (
                "Empty panel".to_string(),
                "x".to_string(),
                "y".to_string(),
                vec![],
            ),
        ];
        let paths = panels_chart(&dir.join("views"), &panels).unwrap();
        assert_eq!(png_size(&paths[0]), PANELS_SIZE);
        let svg = fs::read_to_string(&paths[1]).unwrap();
        for text in [
            "Activation by rank",
            "Score",
            "Empty panel",
            "reasoning",
            "control",
            "feature rank",
        ] {
            assert!(svg.contains(text), "SVG lacks {text:?}");
        }
        // Thinning keeps the SVG small even with 2 x 65,536 points.
        assert!(svg.len() < 2_000_000, "SVG is {} bytes", svg.len());

        let paths = panels_chart(&dir.join("none"), &[]).unwrap();
        assert_eq!(png_size(&paths[0]), PANELS_SIZE);
        no_tmp_files(&dir);
    }

    #[test]
    fn pad_range_is_never_empty() {
        assert_eq!(
            pad_range((f64::INFINITY, f64::NEG_INFINITY), 0.05),
            (0.0, 1.0)
        );
        assert_eq!(pad_range((0.0, 0.0), 0.05), (-1.0, 1.0));
        let (lo, hi) = pad_range((5.0, 5.0), 0.05);
        assert!(lo < 5.0 && hi > 5.0);
        let (lo, hi) = pad_range((-f64::MAX, f64::MAX), 0.05);
        assert!(lo.is_finite() && hi.is_finite() && lo < hi);
    }

    #[test]
    fn thin_keeps_extremes() {
        let points: Vec<(f64, f64)> = (0..10_000)
            .map(|i| (i as f64, if i == 4321 { 99.0 } else { 0.0 }))
            .collect();
        let thinned = thin(&points, 100);
        assert!(thinned.len() <= 100);
        assert!(thinned.contains(&(4321.0, 99.0)));
        assert!(thinned.windows(2).all(|w| w[0].0 < w[1].0));
    }

    fn sample_table() -> Table {
        Table {
            headers: vec!["name".into(), "score".into(), "note".into()],
            rows: vec![
                vec!["alpha".into(), "0.5".into(), "plain".into()],
                vec!["beta, gamma".into(), "12.25".into(), "say \"hi\"".into()],
                vec!["a|b".into(), "-3".into(), "two\nlines".into()],
                vec!["short".into()],
            ],
        }
    }

    #[test]
    fn table_csv_quotes_per_rfc4180() {
        let csv = sample_table().to_csv();
        assert_eq!(
            csv,
            "name,score,note\r\n\
             alpha,0.5,plain\r\n\
             \"beta, gamma\",12.25,\"say \"\"hi\"\"\"\r\n\
             a|b,-3,\"two\nlines\"\r\n\
             short,,\r\n"
        );
        assert_eq!(Table::default().to_csv(), "");
    }

    #[test]
    fn table_markdown() {
        let md = sample_table().to_markdown();
        let expected = "\
| name        | score | note         |
| ----------- | ----: | ------------ |
| alpha       |   0.5 | plain        |
| beta, gamma | 12.25 | say \"hi\"     |
| a\\|b        |    -3 | two<br>lines |
| short       |       |              |
";
        assert_eq!(md, expected);
        assert_eq!(Table::default().to_markdown(), "");
    }

    #[test]
    fn table_text() {
        let text = sample_table().to_text();
        let expected = "\
name         score  note
-----------  -----  ---------
alpha          0.5  plain
beta, gamma  12.25  say \"hi\"
a|b             -3  two lines
short
";
        assert_eq!(text, expected);
    }

    #[test]
    fn write_atomic_replaces_and_cleans_up() {
        let dir = temp_dir("atomic");
        let path = dir.join("out.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        no_tmp_files(&dir);
        // A missing folder is an error, and leaves nothing behind.
        assert!(write_atomic(&dir.join("missing").join("x"), b"x").is_err());
        no_tmp_files(&dir);
    }

    /// An output at a symbolic link replaces the file it points to (the link stays); a folder or
    /// a pipe at the output path is refused, not replaced, and nothing is left behind.
    #[cfg(unix)]
    #[test]
    fn write_atomic_follows_links_and_refuses_special_files() {
        let dir = temp_dir("atomic-special");
        fs::write(dir.join("target.json"), b"old").unwrap();
        std::os::unix::fs::symlink("target.json", dir.join("link.json")).unwrap();
        write_atomic(&dir.join("link.json"), b"new").unwrap();
        assert!(fs::symlink_metadata(dir.join("link.json")).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(dir.join("target.json")).unwrap(), b"new");
        // A dangling link: the file is created where it points.
        std::os::unix::fs::symlink("made.json", dir.join("dangling.json")).unwrap();
        write_atomic(&dir.join("dangling.json"), b"made").unwrap();
        assert_eq!(fs::read(dir.join("made.json")).unwrap(), b"made");
        fs::create_dir(dir.join("folder")).unwrap();
        let e = format!("{:#}", write_atomic(&dir.join("folder"), b"x").unwrap_err());
        assert!(e.contains("folder") && e.contains("not a regular file"), "{e}");
        assert!(dir.join("folder").is_dir());
        let fifo = dir.join("pipe");
        if std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
            let e = format!("{:#}", write_atomic(&fifo, b"x").unwrap_err());
            assert!(e.contains("pipe") && e.contains("not a regular file"), "{e}");
            assert!(!fs::symlink_metadata(&fifo).unwrap().is_file());
        }
        no_tmp_files(&dir);
    }
}
