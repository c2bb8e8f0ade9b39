// Package report writes benchmark results: markdown tables, a JSON file with
// every figure, and PNG plots (gonum.org/v1/plot).
package report

import (
	"encoding/json"
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// Table is a markdown table.
type Table struct {
	Title  string
	Header []string
	Rows   [][]string
}

// Add appends a row of values formatted with fmt.Sprint (floats with F).
func (t *Table) Add(cells ...any) {
	row := make([]string, len(cells))
	for i, c := range cells {
		switch v := c.(type) {
		case string:
			row[i] = v
		case float64:
			row[i] = F(v)
		default:
			row[i] = fmt.Sprint(v)
		}
	}
	t.Rows = append(t.Rows, row)
}

// Markdown renders the table.
func (t *Table) Markdown() string {
	var b strings.Builder
	if t.Title != "" {
		fmt.Fprintf(&b, "### %s\n\n", t.Title)
	}
	b.WriteString("| " + strings.Join(t.Header, " | ") + " |\n|")
	for range t.Header {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, r := range t.Rows {
		b.WriteString("| " + strings.Join(r, " | ") + " |\n")
	}
	return b.String()
}

// F formats a float with a precision that suits its magnitude.
func F(v float64) string {
	a := math.Abs(v)
	switch {
	case v == 0:
		return "0"
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

// Ms formats nanoseconds as milliseconds.
func Ms(ns int64) string {
	ms := float64(ns) / 1e6
	switch {
	case ms >= 100:
		return fmt.Sprintf("%.0f ms", ms)
	case ms >= 10:
		return fmt.Sprintf("%.1f ms", ms)
	case ms >= 1:
		return fmt.Sprintf("%.2f ms", ms)
	default:
		return fmt.Sprintf("%.0f µs", ms*1000)
	}
}

// MiB formats KiB as MiB.
func MiB(kib int64) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }

// Machine describes the machine the benchmark runs on.
func Machine() string {
	model := ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				if _, v, ok := strings.Cut(l, ":"); ok {
					model = strings.TrimSpace(v)
				}
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		f := strings.Fields(string(b))
		if len(f) > 1 {
			var kb float64
			fmt.Sscan(f[1], &kb)
			mem = fmt.Sprintf("%.0f GiB RAM", kb/1024/1024)
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%d CPUs (%s), %s, Linux %s, %s", runtime.NumCPU(), model, mem,
		strings.TrimSpace(string(kernel)), runtime.Version())
}

// Doc is a results document.
type Doc struct {
	Scenario string
	Command  string
	Date     time.Time
	Parts    []string
}

// Add appends a markdown part.
func (d *Doc) Add(format string, args ...any) {
	d.Parts = append(d.Parts, fmt.Sprintf(format, args...))
}

// AddTable appends a table.
func (d *Doc) AddTable(t *Table) { d.Parts = append(d.Parts, t.Markdown()) }

// Markdown renders the document.
func (d *Doc) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "## %s — %s\n\n", d.Scenario, d.Date.Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(&b, "Command: `%s`\n\nMachine: %s\n\n", d.Command, Machine())
	for _, p := range d.Parts {
		b.WriteString(p)
		if !strings.HasSuffix(p, "\n\n") {
			b.WriteString("\n")
			if !strings.HasSuffix(p, "\n") {
				b.WriteString("\n")
			}
		}
	}
	return b.String()
}

// Write writes <dir>/<name>.md and <dir>/<name>.json.
func Write(dir, name string, d *Doc, data any) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, name+".md"), []byte(d.Markdown()), 0o644); err != nil {
		return err
	}
	js, err := json.MarshalIndent(struct {
		Scenario string    `json:"scenario"`
		Command  string    `json:"command"`
		Date     time.Time `json:"date"`
		Machine  string    `json:"machine"`
		Results  any       `json:"results"`
	}{d.Scenario, d.Command, d.Date, Machine(), data}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name+".json"), append(js, '\n'), 0o644)
}

// Series is one line of a plot.
type Series struct {
	Name string
	X, Y []float64
}

// PlotOpts describes a line plot.
type PlotOpts struct {
	Title, X, Y string
	LogX, LogY  bool
	Points      bool // draw point glyphs too
	YFrom0      bool // start the Y axis at 0
}

var palette = []color.Color{
	color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
	color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
	color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff},
	color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
	color.RGBA{R: 0x94, G: 0x67, B: 0xbd, A: 0xff},
	color.RGBA{R: 0x8c, G: 0x56, B: 0x4b, A: 0xff},
	color.RGBA{R: 0xe3, G: 0x77, B: 0xc2, A: 0xff},
	color.RGBA{R: 0x7f, G: 0x7f, B: 0x7f, A: 0xff},
}

// LinePlot writes a PNG line plot of series to path.
func LinePlot(path string, o PlotOpts, series []Series) error {
	p := plot.New()
	p.Title.Text = o.Title
	p.X.Label.Text = o.X
	p.Y.Label.Text = o.Y
	p.Legend.Top = true
	p.Legend.Left = true
	if o.LogX {
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	}
	if o.LogY {
		p.Y.Scale = plot.LogScale{}
		p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	}
	p.Add(plotter.NewGrid())
	sort.SliceStable(series, func(i, j int) bool { return series[i].Name < series[j].Name })
	n := 0
	for i, s := range series {
		var xys plotter.XYs
		for k := range s.X {
			x, y := s.X[k], s.Y[k]
			if (o.LogX && x <= 0) || (o.LogY && y <= 0) || math.IsNaN(x) || math.IsNaN(y) {
				continue
			}
			xys = append(xys, plotter.XY{X: x, Y: y})
		}
		if len(xys) == 0 {
			continue
		}
		n++
		l, err := plotter.NewLine(xys)
		if err != nil {
			return err
		}
		c := palette[i%len(palette)]
		l.Color = c
		l.Width = vg.Points(1.5)
		if i >= len(palette) {
			l.Dashes = []vg.Length{vg.Points(4), vg.Points(2)}
		}
		p.Add(l)
		if o.Points {
			sc, err := plotter.NewScatter(xys)
			if err != nil {
				return err
			}
			sc.GlyphStyle.Color = c
			sc.GlyphStyle.Radius = vg.Points(2.5)
			sc.GlyphStyle.Shape = draw.CircleGlyph{}
			p.Add(sc)
			p.Legend.Add(s.Name, l, sc)
		} else {
			p.Legend.Add(s.Name, l)
		}
	}
	if n == 0 {
		return fmt.Errorf("plot %s: no data", path)
	}
	if o.YFrom0 && !o.LogY {
		p.Y.Min = 0
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return p.Save(9*vg.Inch, 5.5*vg.Inch, path)
}

// Median returns the median of xs (0 for none).
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
